-- dweetpipe's schema: the lossless raw dweets, one row per numeric reading (Grafana-ready),
-- dead letters with their reason, and what the worker knows of each thing.

CREATE TABLE IF NOT EXISTS dweets (
    thing       text        NOT NULL,
    created     timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    content     jsonb       NOT NULL,
    PRIMARY KEY (thing, created)
);

CREATE TABLE IF NOT EXISTS readings (
    time   timestamptz      NOT NULL,
    thing  text             NOT NULL,
    sensor text             NOT NULL,
    value  double precision NOT NULL,
    PRIMARY KEY (thing, sensor, time)
);

-- The primary keys serve "one thing over a time range". Rows arrive in time order, so a BRIN
-- index serves "the whole fleet over a time range" at almost no cost per insert.
CREATE INDEX IF NOT EXISTS readings_time_brin ON readings USING brin (time);
CREATE INDEX IF NOT EXISTS dweets_created_brin ON dweets USING brin (created);

CREATE TABLE IF NOT EXISTS dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    thing       text,
    created     text,
    received_at timestamptz NOT NULL,
    payload     text        NOT NULL,
    reason      text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dead_letters_received_at ON dead_letters (received_at);

CREATE TABLE IF NOT EXISTS things (
    thing            text PRIMARY KEY,
    -- The newest dweet stored: every dweet of the thing up to it is in `dweets`.
    last_created     timestamptz,
    last_received_at timestamptz,
    stream_state     text,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- One column per S5D9 sensor, for people who want a wide table.
CREATE OR REPLACE VIEW s5d9_readings AS
SELECT
    time,
    thing,
    max(value) FILTER (WHERE sensor = 'sensors.TemperatureC') AS temperature_c,
    max(value) FILTER (WHERE sensor = 'sensors.TemperatureF') AS temperature_f,
    max(value) FILTER (WHERE sensor = 'sensors.Humidity')     AS humidity,
    max(value) FILTER (WHERE sensor = 'sensors.Pressure')     AS pressure,
    max(value) FILTER (WHERE sensor = 'sensors.AccelX')       AS accel_x,
    max(value) FILTER (WHERE sensor = 'sensors.AccelY')       AS accel_y,
    max(value) FILTER (WHERE sensor = 'sensors.AccelZ')       AS accel_z,
    max(value) FILTER (WHERE sensor = 'sensors.MagX')         AS mag_x,
    max(value) FILTER (WHERE sensor = 'sensors.MagY')         AS mag_y,
    max(value) FILTER (WHERE sensor = 'sensors.MagZ')         AS mag_z,
    max(value) FILTER (WHERE sensor = 'sensors.SoundLevel')   AS sound_level,
    max(value) FILTER (WHERE sensor = 'sensors.LED')          AS led,
    max(value) FILTER (WHERE sensor = 'globals.dweet-count')  AS dweet_count
FROM readings
GROUP BY time, thing;

-- A read-only role for Grafana and analysts: `CREATE ROLE grafana LOGIN PASSWORD '...'
-- IN ROLE dweetpipe_reader;`. Creating roles needs CREATEROLE; without it the role is skipped
-- with a notice, and the README says how to create it by hand.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dweetpipe_reader') THEN
        CREATE ROLE dweetpipe_reader NOLOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO dweetpipe_reader', current_database());
    GRANT USAGE ON SCHEMA public TO dweetpipe_reader;
    GRANT SELECT ON dweets, readings, dead_letters, things, s5d9_readings TO dweetpipe_reader;
EXCEPTION
    WHEN insufficient_privilege OR duplicate_object OR unique_violation THEN
        RAISE NOTICE 'dweetpipe_reader not set up here (%); see the README', SQLERRM;
END
$$;

-- TimescaleDB is optional: where the extension is installed, readings become a hypertable.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('readings', 'time', if_not_exists => true, migrate_data => true);
    END IF;
END
$$;
