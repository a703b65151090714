-- A clinician's review of an assessment: accept it, or override it with a coded reason.
-- An override never changes patients.current_tier (only an alert resolution lowers a tier); it is
-- kept as the clinician's disagreement and feeds the per-rule override figures (alert fatigue).
-- comment_enc: free text (PHI-ish), AES-256-GCM under the patient's data key, AAD bound to the row.

CREATE TABLE assessment_overrides (
  id             bigserial PRIMARY KEY,
  assessment_id  bigint NOT NULL REFERENCES assessments (id),
  patient_ref    text NOT NULL,
  decision       text NOT NULL CHECK (decision IN ('accept', 'override')),
  reason_code    text CHECK (reason_code IN ('clinical-judgement-lower', 'clinical-judgement-higher',
                                             'known-chronic', 'not-patient-statement',
                                             'false-positive-idiom', 'data-error')),
  comment_enc    bytea,
  actor          text NOT NULL,
  at             timestamptz NOT NULL DEFAULT now(),
  rule_ids       text[] NOT NULL DEFAULT '{}',   -- "id@version" of the rules that fired on the assessment
  CHECK ((decision = 'override') = (reason_code IS NOT NULL))
);
CREATE INDEX assessment_overrides_assessment ON assessment_overrides (assessment_id, at);
CREATE INDEX assessment_overrides_patient ON assessment_overrides (patient_ref, at);
CREATE INDEX assessment_overrides_rules ON assessment_overrides USING gin (rule_ids);
