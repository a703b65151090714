-- What the EHR says about a patient's history, cached for the rules (prior attempt, diagnoses, age).
ALTER TABLE patients
  ADD COLUMN conditions         text[],          -- ICD-10 / SNOMED codes from Condition resources
  ADD COLUMN prior_attempt      boolean,         -- NULL = not known (the EHR could not be asked)
  ADD COLUMN birth_date         date,
  ADD COLUMN history_checked_at timestamptz;
