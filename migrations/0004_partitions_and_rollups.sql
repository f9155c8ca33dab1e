-- History that stays fast to read as the fleet and the months grow.
--
-- `dweets` and `readings` become range-partitioned by time. Inside each partition the readings
-- key leads with the board, `(thing, time, sensor)`, and carries the value, so one board's
-- range is one contiguous, index-only read of its own rows, whatever the fleet's size. Old
-- history goes a whole partition at a time (retention), never by DELETE.
--
-- A database filled under schema 3 is not rewritten: its tables are renamed `*_legacy` and
-- attached as the first partition (from the beginning of time to the UTC day after its newest
-- row). `readings_legacy` gets the new key built beside its rows (an index build, not a copy).
--
-- `readings_1m` and `readings_1h` are the rollups: count, sum, minimum and maximum per board,
-- sensor and bucket (the average is sum / n). The sink notes each (thing, minute) a commit
-- touches in `rollup_pending`, in the same transaction; a refresher recomputes those whole
-- buckets from the committed rows, so a late dweet updates its bucket and a repeat changes
-- nothing. They are filled here from what schema 3 held.
--
-- `dweetpipe_partitions` lists every partition with its bounds: the sink reads it to know what
-- exists, and retention to know what is old enough to drop.

CREATE TABLE dweetpipe_partitions (
    name      text PRIMARY KEY,
    parent    text        NOT NULL,
    from_time timestamptz NOT NULL,
    to_time   timestamptz NOT NULL
);
CREATE INDEX dweetpipe_partitions_parent ON dweetpipe_partitions (parent, from_time);

-- The wide view reads `readings`; it follows the renamed table, so it is made again below.
DROP VIEW IF EXISTS s5d9_readings;

ALTER TABLE readings RENAME TO readings_legacy;
ALTER TABLE readings_legacy DROP CONSTRAINT readings_pkey;
ALTER TABLE dweets RENAME TO dweets_legacy;
ALTER INDEX dweets_pkey RENAME TO dweets_legacy_pkey;

CREATE TABLE dweets (
    thing       text        NOT NULL,
    created     timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    content     jsonb       NOT NULL,
    PRIMARY KEY (thing, created)
) PARTITION BY RANGE (created);

CREATE TABLE readings (
    time   timestamptz      NOT NULL,
    thing  text             NOT NULL,
    sensor text             NOT NULL,
    value  double precision NOT NULL,
    PRIMARY KEY (thing, time, sensor) INCLUDE (value)
) PARTITION BY RANGE (time);

CREATE TABLE readings_1m (
    bucket timestamptz      NOT NULL,
    thing  text             NOT NULL,
    sensor text             NOT NULL,
    n      bigint           NOT NULL,
    sum    double precision NOT NULL,
    min    double precision NOT NULL,
    max    double precision NOT NULL,
    PRIMARY KEY (thing, bucket, sensor)
) PARTITION BY RANGE (bucket);

CREATE TABLE readings_1h (LIKE readings_1m INCLUDING ALL) PARTITION BY RANGE (bucket);

CREATE TABLE rollup_pending (
    thing  text        NOT NULL,
    bucket timestamptz NOT NULL,
    PRIMARY KEY (thing, bucket)
);

DO $$
DECLARE
    upper timestamptz;
BEGIN
    SELECT date_trunc('day', greatest(
               (SELECT max(time) FROM readings_legacy),
               (SELECT max(created) FROM dweets_legacy)), 'UTC') + interval '1 day'
      INTO upper;
    IF upper IS NULL THEN
        -- Nothing stored yet: the worker creates partitions as dweets need them.
        DROP TABLE readings_legacy;
        DROP TABLE dweets_legacy;
        RETURN;
    END IF;
    EXECUTE format('ALTER TABLE readings ATTACH PARTITION readings_legacy FOR VALUES FROM (MINVALUE) TO (%L)', upper);
    EXECUTE format('ALTER TABLE dweets ATTACH PARTITION dweets_legacy FOR VALUES FROM (MINVALUE) TO (%L)', upper);
    EXECUTE format('CREATE TABLE readings_1m_legacy PARTITION OF readings_1m FOR VALUES FROM (MINVALUE) TO (%L)', upper);
    EXECUTE format('CREATE TABLE readings_1h_legacy PARTITION OF readings_1h FOR VALUES FROM (MINVALUE) TO (%L)', upper);
    INSERT INTO dweetpipe_partitions (name, parent, from_time, to_time) VALUES
        ('readings_legacy', 'readings', '-infinity', upper),
        ('dweets_legacy', 'dweets', '-infinity', upper),
        ('readings_1m_legacy', 'readings_1m', '-infinity', upper),
        ('readings_1h_legacy', 'readings_1h', '-infinity', upper);
    INSERT INTO readings_1m (bucket, thing, sensor, n, sum, min, max)
    SELECT date_trunc('minute', time, 'UTC'), thing, sensor, count(*), sum(value), min(value), max(value)
      FROM readings_legacy
     GROUP BY 1, 2, 3;
    INSERT INTO readings_1h (bucket, thing, sensor, n, sum, min, max)
    SELECT date_trunc('hour', bucket, 'UTC'), thing, sensor, sum(n), sum(sum), min(min), max(max)
      FROM readings_1m
     GROUP BY 1, 2, 3;
END
$$;

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

DO $$
BEGIN
    GRANT SELECT ON dweets, readings, readings_1m, readings_1h, s5d9_readings TO dweetpipe_reader;
EXCEPTION
    WHEN undefined_object OR insufficient_privilege THEN
        RAISE NOTICE 'dweetpipe_reader not granted the new tables (%); see the README', SQLERRM;
END
$$;
