-- psych-cds core schema: events in, assessments, alerts, outbox of FHIR writes, quarantine, feeds.
-- PHI columns end in _enc: AES-256-GCM ciphertext from compliance.crypto, bound to their row by AAD.

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cds_app') THEN
    CREATE ROLE cds_app NOLOGIN;
  END IF;
END $$;
GRANT USAGE ON SCHEMA public TO cds_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO cds_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO cds_app;

-- Every input, once: idempotent on (source, resource_type, resource_id, version_id).
CREATE TABLE events (
  id               bigserial PRIMARY KEY,
  source           text NOT NULL,
  resource_type    text NOT NULL,
  resource_id      text NOT NULL,
  version_id       text NOT NULL,
  patient_ref      text NOT NULL,
  conversation_id  text,
  source_updated   timestamptz,            -- meta.lastUpdated (or sent/authored) as the source says
  received_at      timestamptz NOT NULL DEFAULT now(),
  resource_enc     bytea NOT NULL,
  status           text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'done', 'superseded', 'failed')),
  attempts         integer NOT NULL DEFAULT 0,
  last_error       text,                   -- never PHI: exception class and rule/field names only
  processed_at     timestamptz,
  UNIQUE (source, resource_type, resource_id, version_id)
);
CREATE INDEX events_pending ON events (id) WHERE status = 'pending';
CREATE INDEX events_patient ON events (patient_ref, id);
CREATE INDEX events_conversation ON events (conversation_id, id) WHERE conversation_id IS NOT NULL;

CREATE TABLE assessments (
  id               bigserial PRIMARY KEY,
  event_id         bigint REFERENCES events (id),
  patient_ref      text NOT NULL,
  created_at       timestamptz NOT NULL DEFAULT now(),
  tier             smallint NOT NULL CHECK (tier BETWEEN 0 AND 4),
  probability      double precision,
  flags            text[] NOT NULL DEFAULT '{}',
  missing          text[] NOT NULL DEFAULT '{}',
  scores           jsonb NOT NULL DEFAULT '{}',   -- instrument scores (numbers and bands, no text)
  fired            jsonb NOT NULL DEFAULT '[]',   -- [{id, version, title, source, trace}]
  actions          jsonb NOT NULL DEFAULT '[]',
  thresholds       jsonb NOT NULL DEFAULT '{}',
  basis            text[] NOT NULL DEFAULT '{}',
  ruleset_hash     text NOT NULL,
  ruleset_version  text NOT NULL DEFAULT '',
  model_sha256     text,
  shadow           boolean NOT NULL DEFAULT false,
  signals_enc      bytea NOT NULL,                -- signals with evidence spans (PHI)
  signal_summary   jsonb NOT NULL DEFAULT '[]',   -- names, numbers, tier labels (no text) for look-back rules
  fhir_id          text                           -- RiskAssessment id once written back
);
CREATE INDEX assessments_patient ON assessments (patient_ref, created_at DESC) WHERE NOT shadow;
CREATE INDEX assessments_event ON assessments (event_id);

-- Current state per patient: the tier only falls by a clinician's audited resolution.
CREATE TABLE patients (
  patient_ref        text PRIMARY KEY,
  current_tier       smallint NOT NULL DEFAULT 0,
  tier_since         timestamptz NOT NULL DEFAULT now(),
  last_assessment_id bigint REFERENCES assessments (id),
  display_enc        bytea,                       -- name for the pages (PHI)
  updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE alerts (
  id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  patient_ref      text NOT NULL,
  kind             text NOT NULL,          -- risk | discordance | indeterminate
  status           text NOT NULL DEFAULT 'open'
                   CHECK (status IN ('open', 'acknowledged', 'in_progress', 'escalated', 'resolved')),
  tier             smallint NOT NULL,
  priority         text NOT NULL CHECK (priority IN ('routine', 'urgent', 'asap', 'stat')),
  reason           text NOT NULL,          -- rule titles, never patient text
  assessment_id    bigint REFERENCES assessments (id),
  created_at       timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL DEFAULT now(),
  due_at           timestamptz NOT NULL,
  escalation_level integer NOT NULL DEFAULT 0,
  acknowledged_at  timestamptz,
  acknowledged_by  text,
  resolved_at      timestamptz,
  resolved_by      text,
  resolution_code  text,
  resolution_note_enc bytea
);
CREATE UNIQUE INDEX alerts_one_open ON alerts (patient_ref, kind) WHERE status <> 'resolved';
CREATE INDEX alerts_queue ON alerts (status, due_at);

CREATE TABLE alert_transitions (
  id          bigserial PRIMARY KEY,
  alert_id    uuid NOT NULL REFERENCES alerts (id),
  at          timestamptz NOT NULL DEFAULT now(),
  actor       text NOT NULL,
  from_status text,
  to_status   text NOT NULL,
  detail      jsonb NOT NULL DEFAULT '{}'
);

-- FHIR writes waiting to reach the EHR; one row per transaction bundle.
CREATE TABLE outbox (
  id               bigserial PRIMARY KEY,
  dedupe_key       text NOT NULL UNIQUE,
  kind             text NOT NULL,
  patient_ref      text,
  created_at       timestamptz NOT NULL DEFAULT now(),
  payload_enc      bytea NOT NULL,
  status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
  attempts         integer NOT NULL DEFAULT 0,
  next_attempt_at  timestamptz NOT NULL DEFAULT now(),
  last_error       text,
  sent_at          timestamptz,
  result           jsonb                    -- resource type -> id created in the EHR
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending';

-- Input that could not be parsed or validated, kept for review (nothing is lost).
CREATE TABLE quarantine (
  id             bigserial PRIMARY KEY,
  received_at    timestamptz NOT NULL DEFAULT now(),
  source         text NOT NULL,
  resource_type  text,
  resource_id    text,
  version_id     text,
  reason         text NOT NULL,
  payload_enc    bytea NOT NULL,
  reviewed_at    timestamptz,
  reviewed_by    text,
  UNIQUE (source, resource_type, resource_id, version_id)
);

-- Feed watermarks and health, one row per polled feed.
CREATE TABLE feeds (
  name                 text PRIMARY KEY,
  watermark            timestamptz,
  last_poll_at         timestamptz,
  last_success_at      timestamptz,
  last_event_at        timestamptz,
  consecutive_failures integer NOT NULL DEFAULT 0,
  last_error           text
);

