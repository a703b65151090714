-- Rows still to deliver (pending) or refused for good (dead), by kind: how far behind the EHR's copy of
-- the audit log is, read without scanning every row ever sent. Sent rows, nearly all of them, are not in it.
CREATE INDEX outbox_unsent ON outbox (kind, id) WHERE status <> 'sent';
