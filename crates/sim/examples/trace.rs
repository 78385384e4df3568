//! Temporary: print balance over time.
use streamfarm_core::Policy;
use streamfarm_sim::{Balance, Knobs, Scenario, engine};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let kind = a[1].parse().unwrap();
    let policy: Policy = a[2].parse().unwrap();
    let from: f64 = a[3].parse().unwrap();
    let to: f64 = a[4].parse().unwrap();
    let rate = std::env::var("RATE").ok().and_then(|v| v.parse().ok());
    let s = Scenario::new(
        kind,
        &Knobs {
            rate,
            ..Knobs::default()
        },
    )
    .unwrap();
    let t = engine::run(&s, policy, 1);
    for x in t.samples.iter().filter(|x| x.time >= from && x.time <= to) {
        let b = Balance::of(x);
        println!(
            "{:7.2} max/mean {:.3} min/mean {:.3} {:?}",
            x.time, b.max_over_mean, b.min_over_mean, x.users
        );
    }
}
