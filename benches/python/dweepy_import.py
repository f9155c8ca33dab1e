"""The pipeline a dweepy user would write to keep dweets in PostgreSQL, for `dweetpipe bench
import` to measure beside dweetpipe: json.loads per line, sensors flattened to readings in
Python, and psycopg's batched INSERTs (executemany, one commit per 1,000 dweets).

usage: python3 dweepy_import.py DATABASE_URL FILE.jsonl   (prints the seconds it took)
"""

import json
import sys
import time

import psycopg
from psycopg.types.json import Jsonb

BATCH = 1000
INSERT_DWEET = (
    "INSERT INTO dweets (thing, created, received_at, content) "
    "VALUES (%s, %s, now(), %s) ON CONFLICT DO NOTHING"
)
INSERT_READING = (
    "INSERT INTO readings (time, thing, sensor, value) "
    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"
)


def numeric_leaves(content, prefix=""):
    """Every number (booleans as 0/1) under a dweet's content, by dotted path."""
    for key, value in content.items():
        path = prefix + key
        if isinstance(value, dict):
            yield from numeric_leaves(value, path + ".")
        elif isinstance(value, (bool, int, float)):
            yield path, float(value)


def main(url, path):
    started = time.monotonic()
    dweets, readings = [], []
    with psycopg.connect(url) as connection, open(path, encoding="utf-8") as lines:

        def flush():
            with connection.cursor() as cursor:
                cursor.executemany(INSERT_DWEET, dweets)
                cursor.executemany(INSERT_READING, readings)
            connection.commit()
            dweets.clear()
            readings.clear()

        for line in lines:
            dweet = json.loads(line)
            thing, created, content = dweet["thing"], dweet["created"], dweet["content"]
            dweets.append((thing, created, Jsonb(content)))
            for sensor, value in numeric_leaves(content):
                readings.append((created, thing, sensor, value))
            if len(dweets) >= BATCH:
                flush()
        flush()
    print(f"{time.monotonic() - started:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
