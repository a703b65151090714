-- How far the audit log has been sent to the EHR as AuditEvents (batched, never one per search hit).
CREATE TABLE audit_export_state (
  name      text PRIMARY KEY,
  last_seq  bigint NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT now()
);
