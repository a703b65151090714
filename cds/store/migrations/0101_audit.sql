-- compliance.audit: append-only, hash-chained audit log with Ed25519-signed checkpoints.
-- The app role may only SELECT and INSERT; triggers refuse UPDATE/DELETE/TRUNCATE for every role
-- (a superuser must disable them first, which compliance.audit.verify then detects by the chain).

CREATE TABLE audit_log (
  seq          bigint PRIMARY KEY,               -- gapless, assigned under pg_advisory_xact_lock
  recorded_at  timestamptz NOT NULL,
  event_type   text NOT NULL,
  action       char(1) NOT NULL CHECK (action IN ('C', 'R', 'U', 'D', 'E')),
  outcome      smallint NOT NULL CHECK (outcome IN (0, 4, 8, 12)),   -- FHIR AuditEvent.outcome
  actor        text NOT NULL,
  actor_role   text,
  patient_ref  text,
  purpose      text,
  entity       jsonb,                            -- references, ids, hashes, codes: never patient text
  detail       jsonb,
  prev_hash    text NOT NULL,
  hash         text NOT NULL UNIQUE
);
CREATE INDEX audit_log_recorded ON audit_log (recorded_at);
CREATE INDEX audit_log_patient ON audit_log (patient_ref, seq) WHERE patient_ref IS NOT NULL;
CREATE INDEX audit_log_event_type ON audit_log (event_type, seq);

CREATE TABLE audit_signing_keys (
  key_id          text PRIMARY KEY,              -- first 16 hex of sha256(raw Ed25519 public key)
  algorithm       text NOT NULL DEFAULT 'Ed25519',
  public_key_pem  text NOT NULL,
  created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_checkpoints (
  seq            bigint PRIMARY KEY,             -- the audit_log.seq whose hash is signed
  hash           text NOT NULL,
  signed_at      timestamptz NOT NULL,
  signature      bytea NOT NULL,
  public_key_id  text NOT NULL REFERENCES audit_signing_keys (key_id)
);

CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
  FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
  FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
  FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_signing_keys_append_only BEFORE UPDATE OR DELETE ON audit_signing_keys
  FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_signing_keys_no_truncate BEFORE TRUNCATE ON audit_signing_keys
  FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

REVOKE ALL ON audit_log, audit_checkpoints, audit_signing_keys FROM cds_app;
GRANT SELECT, INSERT ON audit_log, audit_checkpoints, audit_signing_keys TO cds_app;
