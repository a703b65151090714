"""CDS Hooks 2.0 service (discovery, patient-view, encounter-start, feedback) over the stored
assessments; see README.md beside this file for the decisions."""
