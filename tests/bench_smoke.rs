//! The benchmark still runs: a short smoke run of `examples/bench/` that
//! asserts nothing about speed.

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/examples/bench`, built by `cargo test` with the other
/// examples.
fn bench_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    profile_dir.join("examples").join("bench")
}

#[test]
fn benchmark_smoke_run() {
    let bench = bench_binary();
    assert!(
        bench.exists(),
        "{} is missing: `cargo test` builds the examples",
        bench.display()
    );
    let out = Command::new(&bench)
        .args(["--smoke", "--ops", "load,save,save_grouped,delete"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run the benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "benchmark failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("## Results"), "{stdout}");
    assert!(stdout.contains("| save_grouped"), "{stdout}");
}

/// The scale benchmark still runs: two small counts, a plain table and one
/// with four partitions. Asserts nothing about speed.
#[test]
fn scale_benchmark_smoke_run() {
    let bench = bench_binary().with_file_name("scale_bench");
    assert!(bench.exists(), "{} is missing", bench.display());
    let out = Command::new(&bench)
        .arg("--smoke")
        .env_remove("DATABASE_URL")
        .output()
        .expect("run the scale benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scale benchmark failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "## plain",
        "## 4 partitions",
        "| 5,000 | save_if |",
        "## Summary",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
}
