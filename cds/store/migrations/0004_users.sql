-- People who sign in, their roles and wards; break-glass grants.
CREATE TABLE users (
  id              bigserial PRIMARY KEY,
  username        text NOT NULL UNIQUE,
  display         text NOT NULL,
  role            text NOT NULL CHECK (role IN ('psychiatrist', 'nurse', 'supervisor', 'compliance', 'admin')),
  wards           text[] NOT NULL DEFAULT '{}',       -- care teams / wards whose patients they see ('*' = all)
  password_hash   text,                               -- scrypt; NULL for single-sign-on-only accounts
  practitioner_ref text,                              -- Practitioner/... in the EHR
  failed_logins   integer NOT NULL DEFAULT 0,
  locked_until    timestamptz,
  disabled        boolean NOT NULL DEFAULT false,
  created_at      timestamptz NOT NULL DEFAULT now()
);

-- Which ward/care team a patient belongs to (from the EHR; the demo assigns one).
ALTER TABLE patients ADD COLUMN ward text;

CREATE TABLE break_glass (
  id          bigserial PRIMARY KEY,
  user_id     bigint NOT NULL REFERENCES users (id),
  patient_ref text NOT NULL,
  reason      text NOT NULL,
  granted_at  timestamptz NOT NULL DEFAULT now(),
  expires_at  timestamptz NOT NULL
);
CREATE INDEX break_glass_active ON break_glass (user_id, patient_ref, expires_at);
