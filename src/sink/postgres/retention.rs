//! Retention: partitions wholly older than `[postgres] retention` (raw tables) or
//! `rollup_retention` (rollups) are detached and dropped. Never a `DELETE`: dropping a table
//! writes no WAL, needs no vacuum and takes milliseconds.
//!
//! Each step survives a crash between steps: the catalog row goes last, so a partition that was
//! detached (or left "detach pending" by `DETACH … CONCURRENTLY`) but not dropped is finished
//! by the next run. `DETACH … CONCURRENTLY` keeps live writers of newer partitions from waiting.

use sqlx::PgPool;

use super::PostgresConfig;

/// One partition removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub name: String,
    pub parent: String,
    /// Where the partition ended (RFC 3339): everything before it in `parent` is gone.
    pub until: String,
}

const RAW: [&str; 2] = ["dweets", "readings"];
const ROLLUPS: [&str; 2] = ["readings_1m", "readings_1h"];

/// Drops every partition that ends at or before its table's cut-off; returns them.
pub async fn prune(
    pool: &PgPool,
    config: &PostgresConfig,
    now_ms: i64,
) -> Result<Vec<Dropped>, sqlx::Error> {
    let mut dropped = Vec::new();
    for (parents, kept) in [(RAW, config.retention), (ROLLUPS, config.rollup_retention)] {
        let Some(kept) = kept else { continue };
        let cut = crate::record::ms_before(now_ms, kept);
        for parent in parents {
            let old: Vec<(String, String)> = sqlx::query_as(
                "SELECT name, to_char(to_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                   FROM dweetpipe_partitions
                  WHERE parent = $1 AND to_time <= to_timestamp($2::double precision / 1000)
                  ORDER BY to_time",
            )
            .bind(parent)
            .bind(cut as f64)
            .fetch_all(pool)
            .await?;
            for (name, until) in old {
                drop_partition(pool, parent, &name).await?;
                tracing::info!(partition = %name, table = parent, %until, "retention dropped a partition");
                dropped.push(Dropped {
                    name,
                    parent: parent.to_owned(),
                    until,
                });
            }
        }
    }
    Ok(dropped)
}

async fn drop_partition(pool: &PgPool, parent: &str, name: &str) -> Result<(), sqlx::Error> {
    let attached: Option<bool> = sqlx::query_scalar(
        "SELECT i.inhdetachpending FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
          WHERE c.relname = $1 AND i.inhparent = $2::regclass",
    )
    .bind(name)
    .bind(parent)
    .fetch_optional(pool)
    .await?;
    let detach = match attached {
        Some(false) => Some(format!(
            "ALTER TABLE {parent} DETACH PARTITION {name} CONCURRENTLY"
        )),
        Some(true) => Some(format!(
            "ALTER TABLE {parent} DETACH PARTITION {name} FINALIZE"
        )),
        None => None,
    };
    if let Some(statement) = detach {
        // Outside a transaction: CONCURRENTLY refuses to run inside one.
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(pool)
            .await?;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {name}")))
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM dweetpipe_partitions WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}
