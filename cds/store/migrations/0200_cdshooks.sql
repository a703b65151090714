-- CDS Hooks cards and feedback, replay protection for the EHR's JWTs, operations alarms.
-- (integrations/cdshooks, integrations/fhir/watchdog.py)

-- Every card psych-cds issued, so feedback on it links back to the rules that fired.
CREATE TABLE cds_cards (
  uuid           uuid PRIMARY KEY,
  service        text NOT NULL,                 -- CDS Hooks service id
  hook_instance  text NOT NULL,
  patient_ref    text NOT NULL,
  assessment_id  bigint REFERENCES assessments (id),
  tier           smallint NOT NULL CHECK (tier BETWEEN 0 AND 4),
  indicator      text NOT NULL CHECK (indicator IN ('info', 'warning', 'critical')),
  rule_ids       text[] NOT NULL DEFAULT '{}',  -- "id@version" of each rule behind the card
  suggestion_ids uuid[] NOT NULL DEFAULT '{}',
  issuer         text,                          -- JWT iss of the EHR that asked
  issued_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cds_cards_patient ON cds_cards (patient_ref, issued_at DESC);

-- What clinicians did with the cards (CDS Hooks feedback): counted in the rule figures.
CREATE TABLE cds_feedback (
  id                   bigserial PRIMARY KEY,
  card                 uuid NOT NULL REFERENCES cds_cards (uuid),
  service              text NOT NULL,
  outcome              text NOT NULL CHECK (outcome IN ('accepted', 'overridden')),
  accepted_suggestions uuid[] NOT NULL DEFAULT '{}',
  override_reason      jsonb,                   -- {"reason": Coding}; codes only
  user_comment_enc     bytea,                   -- overrideReason.userComment (free text: PHI, encrypted)
  outcome_timestamp    timestamptz NOT NULL,
  received_at          timestamptz NOT NULL DEFAULT now(),
  patient_ref          text NOT NULL,
  rule_ids             text[] NOT NULL DEFAULT '{}',
  issuer               text,
  UNIQUE (card, outcome, outcome_timestamp)     -- a resent feedback message is stored once
);
CREATE INDEX cds_feedback_rules ON cds_feedback USING gin (rule_ids);

-- jti of every accepted CDS Hooks JWT until it expires: a replayed token is refused.
CREATE TABLE cds_jwt_jti (
  issuer      text NOT NULL,
  jti         text NOT NULL,
  expires_at  timestamptz NOT NULL,
  PRIMARY KEY (issuer, jti)
);
CREATE INDEX cds_jwt_jti_expiry ON cds_jwt_jti (expires_at);

-- Operations alarms (feed watchdog): one open row per alarm name until the feed recovers.
CREATE TABLE ops_alarms (
  id          bigserial PRIMARY KEY,
  name        text NOT NULL,
  raised_at   timestamptz NOT NULL DEFAULT now(),
  cleared_at  timestamptz,
  detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX ops_alarms_open ON ops_alarms (name) WHERE cleared_at IS NULL;
