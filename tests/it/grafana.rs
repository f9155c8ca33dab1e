//! Grafana's PostgreSQL data source, as far as the dashboards use it: the macros expanded the
//! way Grafana expands them (TimescaleDB off), and `$__interval` chosen the way it chooses it.

/// Grafana's "nice" interval for `ms` (its `roundInterval`): what a panel's range divided by
/// its max data points becomes.
pub fn round_interval(ms: i64) -> i64 {
    const STEPS: &[(i64, i64)] = &[
        (10, 1),
        (15, 10),
        (35, 20),
        (75, 50),
        (150, 100),
        (350, 200),
        (750, 500),
        (1_500, 1_000),
        (3_500, 2_000),
        (7_500, 5_000),
        (12_500, 10_000),
        (17_500, 15_000),
        (25_000, 20_000),
        (45_000, 30_000),
        (90_000, 60_000),
        (210_000, 120_000),
        (450_000, 300_000),
        (750_000, 600_000),
        (1_050_000, 900_000),
        (1_500_000, 1_200_000),
        (2_700_000, 1_800_000),
        (5_400_000, 3_600_000),
        (9_000_000, 7_200_000),
        (16_200_000, 10_800_000),
        (32_400_000, 21_600_000),
        (86_400_000, 43_200_000),
        (604_800_000, 86_400_000),
        (1_814_400_000, 604_800_000),
        (3_628_800_000, 2_592_000_000),
    ];
    STEPS
        .iter()
        .find(|(up_to, _)| ms <= *up_to)
        .map_or(31_536_000_000, |(_, step)| *step)
}

/// One panel query's context: the dashboard's range and the panel's interval.
pub struct Query<'a> {
    pub from_ms: i64,
    pub to_ms: i64,
    pub interval_ms: i64,
    /// `$thing` (multi-value: quoted and comma-separated, as Grafana does).
    pub things: &'a [String],
}

impl Query<'_> {
    /// The interval Grafana gives a panel: the range over `max_data_points`, made nice,
    /// and no finer than the panel's own minimum (`"interval": "1h"`).
    pub fn interval_for(from_ms: i64, to_ms: i64, max_data_points: i64, min_ms: i64) -> i64 {
        round_interval((to_ms - from_ms) / max_data_points).max(min_ms)
    }

    /// `sql` with every macro and variable replaced by literals.
    pub fn expand(&self, sql: &str) -> String {
        let time = |ms: i64| {
            dweetpipe::record::ms_to_datetime(ms)
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string()
        };
        let seconds = self.interval_ms / 1000;
        let things = self
            .things
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(",");
        let mut out = sql
            .replace("$__interval_ms", &self.interval_ms.to_string())
            .replace("$__unixEpochFrom()", &(self.from_ms / 1000).to_string())
            .replace("$__unixEpochTo()", &(self.to_ms / 1000).to_string())
            .replace("$thing", &things);
        for column in ["time", "bucket"] {
            out = out
                .replace(
                    &format!("$__timeFilter({column})"),
                    &format!(
                        "{column} BETWEEN '{}' AND '{}'",
                        time(self.from_ms),
                        time(self.to_ms)
                    ),
                )
                .replace(
                    &format!("$__timeGroupAlias({column}, $__interval)"),
                    &format!("floor(extract(epoch from {column})/{seconds})*{seconds} AS \"time\""),
                );
        }
        assert!(!out.contains('$'), "a macro left unexpanded:\n{out}");
        out
    }
}

#[test]
fn intervals_round_as_grafana_rounds_them() {
    let day = 86_400_000;
    assert_eq!(Query::interval_for(0, day, 1000, 0), 60_000, "a day: 1m");
    assert_eq!(
        Query::interval_for(0, 7 * day, 1000, 0),
        600_000,
        "a week: 10m"
    );
    assert_eq!(
        Query::interval_for(0, 30 * day, 1000, 0),
        1_800_000,
        "30 days: 30m"
    );
    assert_eq!(
        Query::interval_for(0, 90 * day, 1000, 0),
        7_200_000,
        "90 days: 2h"
    );
    assert_eq!(
        Query::interval_for(0, 3_600_000, 1000, 0),
        5_000,
        "an hour: 5s"
    );
    assert_eq!(
        Query::interval_for(0, day, 1000, 3_600_000),
        3_600_000,
        "a minimum"
    );
}
