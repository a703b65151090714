-- Wake workers the moment work arrives: a statement-level trigger NOTIFYs once per inserting statement
-- (PostgreSQL folds identical notifications of one transaction into one, delivered at commit), so
-- producers pay no extra round trip. Workers LISTEN and also poll: a missed wake-up only delays.
CREATE OR REPLACE FUNCTION notify_channel() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_wake AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_channel('cds_events');
CREATE TRIGGER outbox_wake AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_channel('cds_outbox');
