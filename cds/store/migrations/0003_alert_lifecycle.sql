-- Alert lifecycle: who is on call, the Task each alert is mirrored to, per-patient FIFO delivery,
-- screening-API clients and their rate limits.

CREATE TABLE oncall (
  id               bigserial PRIMARY KEY,
  role             text NOT NULL CHECK (role IN ('nurse', 'charge_nurse', 'supervisor', 'psychiatrist')),
  practitioner_ref text NOT NULL,              -- Practitioner/... or PractitionerRole/... in the EHR
  display          text NOT NULL,              -- staff name (not patient data)
  phone            text,
  starts_at        timestamptz NOT NULL,
  ends_at          timestamptz NOT NULL,
  created_by       text NOT NULL,
  created_at       timestamptz NOT NULL DEFAULT now(),
  CHECK (ends_at > starts_at)
);
CREATE INDEX oncall_now ON oncall (role, starts_at, ends_at);

ALTER TABLE alerts
  ADD COLUMN assigned_role text NOT NULL DEFAULT 'nurse',
  ADD COLUMN assigned_ref  text,                 -- the Practitioner now responsible, when known
  ADD COLUMN started_at    timestamptz,
  ADD COLUMN started_by    text,
  ADD COLUMN task_version  integer NOT NULL DEFAULT 0;

-- Write-backs of one patient are delivered in order (a Task's later state never overtaken by an earlier one).
CREATE INDEX outbox_patient_pending ON outbox (patient_ref, id) WHERE status = 'pending';

CREATE TABLE api_clients (
  id          bigserial PRIMARY KEY,
  name        text NOT NULL UNIQUE,
  key_sha256  text NOT NULL UNIQUE,             -- the key itself is shown once and never stored
  created_at  timestamptz NOT NULL DEFAULT now(),
  created_by  text NOT NULL,
  revoked_at  timestamptz
);

CREATE TABLE rate_windows (
  client_id    bigint NOT NULL REFERENCES api_clients (id),
  window_start timestamptz NOT NULL,
  count        integer NOT NULL,
  PRIMARY KEY (client_id, window_start)
);
