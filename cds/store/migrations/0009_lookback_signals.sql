-- The rules' look-back read (assessments.recent_signals), one row per signal of every live (non-shadow)
-- assessment, in scalar columns, under a covering index on (patient_ref, name, observed_at).
-- Read before from assessments.signal_summary (jsonb_array_elements over each of the patient's assessments in
-- the window): a chatty patient has one assessment per chat message, so each new message cost a heap visit and a
-- jsonb expansion per earlier message, and at 220 messages/s that read became PostgreSQL's largest cost over a
-- hospital day (pg_stat_statements: 22% of execution time by 60,000 messages). Now an index-only range scan of
-- the wanted names. Non-PHI, like signal_summary, which stays the record (these rows are derived from it).
CREATE TABLE lookback_signals (
  assessment_id bigint NOT NULL REFERENCES assessments (id) ON DELETE CASCADE,
  n             integer NOT NULL,          -- the signal's position in its assessment's signal_summary
  patient_ref   text NOT NULL,
  observed_at   timestamptz NOT NULL,      -- the assessment's created_at
  name          text NOT NULL,
  value_type    text NOT NULL,             -- jsonb_typeof of the value: string, number, boolean, null ...
  value         text,                      -- the value as text (JSON for non-strings)
  source        text,
  tier          text,
  missing       text,                      -- JSON list, NULL when empty
  PRIMARY KEY (assessment_id, n)
);
CREATE INDEX lookback_signals_patient ON lookback_signals (patient_ref, name, observed_at)
  INCLUDE (assessment_id, n, value_type, value, source, tier, missing);

INSERT INTO lookback_signals (assessment_id, n, patient_ref, observed_at, name, value_type, value, source, tier,
                              missing)
SELECT a.id, x.n, a.patient_ref, a.created_at, x.s->>'name', jsonb_typeof(x.s->'value'), x.s->>'value',
       x.s->>'source', x.s->>'tier', NULLIF(x.s->'missing', '[]')::text
FROM assessments a, jsonb_array_elements(a.signal_summary) WITH ORDINALITY AS x(s, n)
WHERE NOT a.shadow;
