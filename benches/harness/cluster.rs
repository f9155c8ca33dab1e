//! `harness cluster`: several `dweetpipe run` members sharing one fleet through a
//! `nats-server -js` of its own: RSS and CPU per member idle and at one dweet a second per
//! thing, dweets/s through the JetStream output, and the time from a member's `kill -9` to its
//! things streaming on the others.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use dweetpipe::sandbox::simulator::thing_name;
use tokio::process::{Child, Command};

use super::{DWEETPIPE, Usage, cpu_percent, mib, spawn_sandbox, spawn_simulator, usage_of};

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Members (worker processes).
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Things in the fleet, spread over the members.
    #[arg(long, default_value_t = 15_000)]
    things: usize,
    /// Things that dweet once a second during the load phase (the first ones); default all.
    #[arg(long)]
    dweeting: Option<usize>,
    /// Seconds measured idle, and again at one dweet a second per thing.
    #[arg(long, default_value_t = 15)]
    secs: u64,
    /// The members' lease.
    #[arg(long, default_value = "10s")]
    lease: String,
}

struct Member {
    child: Child,
    metrics: String,
}

impl Member {
    async fn scrape(&self) -> String {
        match reqwest::get(&self.metrics).await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    fn pid(&self) -> String {
        self.child.id().map(|p| p.to_string()).unwrap_or_default()
    }
}

fn value(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Things owned and streams up, per member.
async fn counts(members: &[Member]) -> Vec<(f64, f64)> {
    let mut counts = Vec::new();
    for member in members {
        let scrape = member.scrape().await;
        counts.push((
            value(&scrape, "dweetpipe_cluster_things_owned"),
            value(&scrape, "dweetpipe_stream_up"),
        ));
    }
    counts
}

/// Waits until every thing is owned once and streaming; every 10 s it prints what each
/// member says, so a stall shows where it is.
async fn wait_all_streaming(
    members: &[Member],
    things: usize,
    within: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut next_report = Duration::from_secs(10);
    loop {
        let counts = counts(members).await;
        let owned: f64 = counts.iter().map(|c| c.0).sum();
        let up: f64 = counts.iter().map(|c| c.1).sum();
        if owned as usize == things && up as usize == things {
            return Ok(started.elapsed());
        }
        let each = counts
            .iter()
            .map(|(owned, up)| format!("{owned} owned/{up} up"))
            .collect::<Vec<_>>()
            .join(", ");
        if started.elapsed() > within {
            bail!("after {within:?}: {owned} of {things} things owned, {up} streams up ({each})");
        }
        if started.elapsed() >= next_report {
            eprintln!("cluster bench: {:.0?}: {each}", started.elapsed());
            next_report += Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn stream_messages(js: &async_nats::jetstream::Context) -> u64 {
    match js.get_stream("dweetpipe-dweets").await {
        Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

pub async fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("dweetpipe-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let nats_port = free_port()?;
    let nats_bin =
        std::env::var("DWEETPIPE_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
    let mut nats = Command::new(&nats_bin)
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port.to_string(),
            "-sd",
        ])
        .arg(dir.join("nats"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {nats_bin} (apt-get install nats-server, or set DWEETPIPE_NATS_SERVER)"
            )
        })?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let (mut sandbox, url) = spawn_sandbox().await?;

    let mut text = format!(
        "[source]\nurl = \"{url}\"\nstart_spread = \"5s\"\n\n[parquet]\ndir = \"{}\"\n\n[nats]\nspool_dir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[cluster]\nnats_url = \"{nats_url}\"\nlease = \"{}\"\n\n",
        dir.join("parquet").display(),
        dir.join("nats-spool").display(),
        args.lease
    );
    for i in 1..=args.things {
        text.push_str(&format!(
            "[[thing]]\nname = \"{}\"\n",
            thing_name("S5D9-", i)
        ));
    }
    let config = dir.join("things.toml");
    std::fs::write(&config, text)?;
    let mut members = Vec::new();
    for index in 0..args.members {
        let port = free_port()?;
        let child = Command::new(DWEETPIPE)
            .args(["run", "--config"])
            .arg(&config)
            .env("DWEETPIPE__CLUSTER__MEMBER", format!("member-{index}"))
            .env("DWEETPIPE__METRICS__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "RUST_LOG",
                "warn,dweetpipe::cluster=info,dweetpipe::worker=info",
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                dir.join(format!("member-{index}.log")),
            )?)
            .kill_on_drop(true)
            .spawn()
            .context("starting a member")?;
        members.push(Member {
            child,
            metrics: format!("http://127.0.0.1:{port}/metrics"),
        });
    }
    eprintln!(
        "cluster bench: waiting for {} streams over {} members",
        args.things, args.members
    );
    let up = wait_all_streaming(&members, args.things, Duration::from_secs(300))
        .await
        .with_context(|| format!("the members' logs are kept in {}", dir.display()))?;
    eprintln!("cluster bench: all streaming after {up:?}; measuring idle, then at load");
    let usage = |members: &[Member]| -> anyhow::Result<Vec<Usage>> {
        members.iter().map(|m| usage_of(&m.pid())).collect()
    };
    let idle_from = usage(&members)?;
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let idle_to = usage(&members)?;

    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await?);
    let dweeting = args.dweeting.unwrap_or(args.things).min(args.things);
    let mut simulator = spawn_simulator(&url, dweeting, args.secs * 2 + 30)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let load_from = usage(&members)?;
    let published_from = stream_messages(&js).await;
    let measured_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let load_to = usage(&members)?;
    let published = stream_messages(&js).await - published_from;
    let published_per_second = published as f64 / measured_from.elapsed().as_secs_f64();

    // A member dies; the others take its things.
    let mut victim = members.remove(0);
    let owned_by_victim = value(&victim.scrape().await, "dweetpipe_cluster_things_owned");
    victim.child.start_kill()?;
    let _ = victim.child.wait().await;
    eprintln!("cluster bench: killed member-0; waiting for its things on the others");
    let moved = wait_all_streaming(&members, args.things, Duration::from_secs(300))
        .await
        .with_context(|| format!("the members' logs are kept in {}", dir.display()))?;
    let _ = simulator.kill().await;
    for member in &mut members {
        let _ = member.child.start_kill();
    }
    let _ = sandbox.kill().await;
    let _ = nats.kill().await;
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "cluster: {} members, {} things over one nats-server -js, lease {} (sandbox, simulator and NATS in other processes)",
        args.members, args.things, args.lease
    );
    println!("  every thing streaming after  {:>8.1} s", up.as_secs_f64());
    for (index, ((i0, i1), (l0, l1))) in idle_from
        .iter()
        .zip(&idle_to)
        .zip(load_from.iter().zip(&load_to))
        .enumerate()
    {
        println!(
            "  member-{index}: idle RSS {:>6.1} MiB CPU {:>5.1}%   with {dweeting} things dweeting 1/s: RSS {:>6.1} MiB CPU {:>5.1}% of one core",
            mib(i1.rss_bytes),
            cpu_percent(*i0, *i1),
            mib(l1.rss_bytes),
            cpu_percent(*l0, *l1)
        );
    }
    println!(
        "  JetStream output             {published_per_second:>8.0} dweets/s published (stream message count over {} s)",
        args.secs
    );
    println!(
        "  kill -9 of member-0 ({owned_by_victim} things): all streaming on the others after {:>5.1} s",
        moved.as_secs_f64()
    );
    Ok(())
}
