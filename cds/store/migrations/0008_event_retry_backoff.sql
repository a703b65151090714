-- An event whose processing failed is tried again after a pause that doubles with each attempt
-- (5 s, 10 s, 20 s, 40 s), not at once: a passing fault (a lock, a restart) gets time to clear before the
-- event is parked as failed, and one bad event cannot keep a worker busy in a tight loop.
ALTER TABLE events ADD COLUMN retry_at timestamptz;
