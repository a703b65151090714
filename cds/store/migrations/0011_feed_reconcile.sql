-- When a feed last re-read its whole overlap window (cds.store.feeds, integrations.fhir.poller): polls in
-- between re-read only the last moments before the watermark, so a fast poll does not fetch the same
-- minute of resources again every half second.
ALTER TABLE feeds ADD COLUMN reconciled_at timestamptz;
