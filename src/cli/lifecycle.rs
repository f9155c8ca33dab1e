//! `dweetpipe plan` and `dweetpipe apply`: the lock and alert lifecycle of things.toml, shown
//! and then made, as `run` does at start, on reload and every `[lifecycle] interval`.

use anyhow::{Context, bail};
use dweetpipe::config::Config;
use dweetpipe::lifecycle::{self, Plan, ThingPlan, describe};

use super::ConfigArgs;

/// Up to this many things, `plan` lists the ones in sync or not managed too.
const LIST_QUIET_UP_TO: usize = 50;

async fn make_plan(args: &ConfigArgs) -> anyhow::Result<(Config, dweetpipe::client::Client, Plan)> {
    let config = Config::load(args.path())?;
    let Some(source) = &config.source else {
        bail!(
            "{}: plan and apply need a [source] url (the server whose locks and alerts to manage)",
            config.path.display()
        );
    };
    let client = source.client().context("the [source] section")?;
    let plan = lifecycle::plan(&client, &config.things).await;
    Ok((config, client, plan))
}

/// One line per change and per problem; the things in sync or not managed too when
/// `list_quiet`, else only their count.
pub fn print_plan(plan: &Plan, list_quiet: bool) {
    let mut quiet = 0;
    for (thing, thing_plan) in &plan.things {
        match thing_plan {
            ThingPlan::Changes(actions) => {
                for &kind in actions {
                    println!("  {}: will {}", thing.name, describe(thing, kind));
                }
            }
            ThingPlan::Problem(_) => println!("  {}: {thing_plan}", thing.name),
            other if list_quiet => println!("  {}: {other}", thing.name),
            _ => quiet += 1,
        }
    }
    if quiet > 0 {
        println!("  ... and {quiet} thing(s) in sync or not managed");
    }
}

/// Prints the plan; exits non-zero when a thing cannot be reconciled.
pub async fn plan(args: ConfigArgs) -> anyhow::Result<()> {
    let (config, client, plan) = make_plan(&args).await?;
    println!(
        "{} against {}:",
        config.path.display(),
        dweetpipe::settings::redact_url(client.base_url())
    );
    // A big fleet's plan shows what needs attention; the quiet things are counted.
    print_plan(&plan, plan.things.len() <= LIST_QUIET_UP_TO);
    match plan.changes() {
        0 if plan.problems() == 0 => println!("Nothing to change."),
        0 => println!("No change apply could make."),
        changes => println!(
            "{changes} change(s) on {} thing(s). `dweetpipe apply --config {}` makes them.",
            plan.drifted(),
            config.path.display()
        ),
    }
    if plan.problems() > 0 {
        bail!(
            "{} thing(s) have a problem apply cannot fix (see above)",
            plan.problems()
        );
    }
    Ok(())
}

/// Makes the plan's changes and prints each; exits non-zero if any failed.
pub async fn apply(args: ConfigArgs) -> anyhow::Result<()> {
    let (config, client, plan) = make_plan(&args).await?;
    for (thing, thing_plan) in &plan.things {
        if let ThingPlan::Problem(why) = thing_plan {
            println!("  {}: PROBLEM: {why}", thing.name);
        }
    }
    if plan.changes() == 0 && plan.problems() == 0 {
        println!(
            "Nothing to change: the server matches {}.",
            config.path.display()
        );
    }
    let done = lifecycle::apply(&client, &plan, None, |thing, entry| match &entry.outcome {
        Ok(()) => println!("  {}: {}: done", thing.name, describe(thing, entry.kind)),
        Err(reason) => println!(
            "  {}: {}: FAILED: {reason}",
            thing.name,
            describe(thing, entry.kind)
        ),
    })
    .await;
    let failed = done.iter().filter(|d| d.outcome.is_err()).count();
    if !done.is_empty() {
        println!(
            "Made {} of {} change(s).",
            done.len() - failed,
            plan.changes()
        );
    }
    if failed > 0 || plan.problems() > 0 {
        bail!(
            "{failed} change(s) failed and {} thing(s) have a problem (see above); \
             the rest was applied, and apply can be run again",
            plan.problems()
        );
    }
    Ok(())
}
