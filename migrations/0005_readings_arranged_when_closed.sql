-- A readings partition is keyed for writing while it is open and for reading once it closes.
--
-- Open: the unique key leads with time, `(time, thing, sensor)`. Rows arrive in time order
-- across the fleet, so every insert lands at the right edge of the B-tree. Keyed by board, a
-- catch-up's inserts landed at one point per board and sensor: measured here on the same run,
-- a 1000-board catch-up's COPY took 15.9 s against 9.6 s, and the index was twice the size
-- (half-empty pages split at a thousand places).
--
-- Closed (its span ended an hour ago): the worker's leader, `import` and `dweetpipe prune`
-- build `(thing, time, sensor) INCLUDE (value)` beside it without blocking writers (CREATE
-- INDEX CONCURRENTLY, packed pages) and drop the time-led one. One board's day then reads only
-- its own rows. Both keys are unique on the same columns, so a late dweet is refused as a
-- repeat whichever of them the partition holds, at every step.
--
-- The parent keeps no unique key (PostgreSQL would force it onto every partition);
-- `INSERT … ON CONFLICT DO NOTHING` checks the unique index of whichever partition a row lands
-- in. `dweetpipe_partitions.arranged` says which key a readings partition has.
--
-- The keys are made again here: board-led for the closed partitions and for the legacy
-- partition of a schema-3 database (its rows are mostly old history, and building its key
-- twice would double the migration; until it closes, writes into it take the board-led key
-- as under schema 4), time-led for the rest.

ALTER TABLE dweetpipe_partitions ADD COLUMN arranged boolean NOT NULL DEFAULT false;

ALTER TABLE readings DROP CONSTRAINT readings_pkey;

DO $$
DECLARE
    part record;
BEGIN
    FOR part IN
        SELECT name, to_time <= now() - interval '1 hour' OR from_time = '-infinity' AS closed
          FROM dweetpipe_partitions WHERE parent = 'readings'
    LOOP
        IF part.closed THEN
            EXECUTE format('CREATE UNIQUE INDEX %I ON %I (thing, time, sensor) INCLUDE (value)',
                           part.name || '_by_board', part.name);
        ELSE
            EXECUTE format('CREATE UNIQUE INDEX %I ON %I (time, thing, sensor)',
                           part.name || '_by_time', part.name);
        END IF;
        UPDATE dweetpipe_partitions SET arranged = part.closed WHERE name = part.name;
    END LOOP;
END
$$;
