-- compliance.crypto: per-subject data keys (DEKs) wrapped by the key-encryption key (KEK).
-- Erasing a subject destroys its DEK (crypto-shredding): wrapped_key is NULLed and the row kept as
-- evidence. Rows are never deleted, so the app role gets no DELETE/TRUNCATE.

CREATE TABLE data_keys (
  id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  subject          text NOT NULL,                 -- "Patient/123", "quarantine", "system"
  wrapped_key      bytea,                         -- nonce | AES-256-GCM(KEK, DEK), AAD = subject
  kek_id           text,                          -- which KEK wrapped it (first 16 hex of sha256)
  created_at       timestamptz NOT NULL DEFAULT now(),
  rotated_at       timestamptz,
  destroyed_at     timestamptz,
  destroyed_reason text,
  CHECK ((destroyed_at IS NULL) = (wrapped_key IS NOT NULL)),
  CHECK ((wrapped_key IS NULL) = (kek_id IS NULL))
);
-- One live key per subject; INSERT ... ON CONFLICT uses this to create keys race-free.
CREATE UNIQUE INDEX data_keys_live_subject ON data_keys (subject) WHERE destroyed_at IS NULL;
CREATE INDEX data_keys_kek ON data_keys (kek_id) WHERE destroyed_at IS NULL;

REVOKE ALL ON data_keys FROM cds_app;
GRANT SELECT, INSERT, UPDATE ON data_keys TO cds_app;
