//! Release-mode benchmark of single-node durable write throughput.
//!
//! Run it with `scripts/bench-write.sh [ARGS]` (or `cargo bench --bench write -- ARGS` after
//! `cargo build --release --bin peersync`). Workloads, each on a fresh temporary data dir:
//!
//! - `library-single`: `C` tasks each doing sequential `NodeHandle::put` until `N` puts in all.
//! - `library-batch`: a few tasks calling `NodeHandle::put_batch` with `B` entries per call.
//! - `http-single`: the release binary as a separate process, driven by `H` keep-alive clients
//!   doing `PUT /v1/registers/bench/{key}` with a 100-byte body.
//! - `http-batch`: the same process setup, a few clients doing `POST /v1/registers/bench` with `B`
//!   entries per request.
//! - `verify`: `OpBatch::verify` over 100 000 ops of one origin in batches of 256.
//!
//! Every write is durable: the node answers only after its group commit is on disk.
//!
//! Arguments:
//!   --ops N               puts per write workload (default 1 000 000)
//!   --quick               50 000 puts per write workload (CI smoke run)
//!   --concurrency C       concurrent tasks of library-single (default 256)
//!   --http-concurrency H  concurrent HTTP clients of http-single (default 64)
//!   --batch B             entries per batch (default 1000)
//!   --batch-concurrency T concurrent tasks/clients of the batch workloads (default 4)
//!   --only W[,W..]        run only these groups: library, http, verify
//!   --json PATH           also write the results as JSON
//!   --node-bin PATH       the peersync binary (default target/release/peersync)

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use peersync::crdt::Hlc;
use peersync::ids::Seq;
use peersync::node::{Node, NodeConfig};
use peersync::op::{ChainHash, Op, OpBatch, OpBody, Signer};
use serde_bytes::ByteBuf;

const REGISTER: &str = "bench";
const VALUE_BYTES: usize = 100;
const VERIFY_OPS: u64 = 100_000;
const VERIFY_BATCH: u64 = 256;

const GOAL_LIBRARY: f64 = 100_000.0;
const GOAL_HTTP_BATCH: f64 = 100_000.0;
const GOAL_HTTP_SINGLE: f64 = 20_000.0;
const GOAL_VERIFY_MS: f64 = 500.0;

struct Args {
    ops: u64,
    concurrency: usize,
    http_concurrency: usize,
    batch: usize,
    batch_concurrency: usize,
    library: bool,
    http: bool,
    verify: bool,
    json: Option<PathBuf>,
    node_bin: Option<PathBuf>,
}

fn usage() -> &'static str {
    "usage: write [--ops N] [--quick] [--concurrency C] [--http-concurrency H] [--batch B] \
     [--batch-concurrency T] [--only library|http|verify[,..]] [--json PATH] [--node-bin PATH]"
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        ops: 1_000_000,
        concurrency: 256,
        http_concurrency: 64,
        batch: 1000,
        batch_concurrency: 4,
        library: true,
        http: true,
        verify: true,
        json: None,
        node_bin: None,
    };
    let mut it = std::env::args().skip(1);
    fn num<T: std::str::FromStr>(name: &str, v: Option<String>) -> Result<T> {
        let v = v.ok_or_else(|| anyhow!("{name} needs a value"))?;
        v.parse().map_err(|_| anyhow!("{name}: {v:?} is not a valid number"))
    }
    while let Some(arg) = it.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next());
        match flag.as_str() {
            "--ops" => a.ops = num("--ops", value())?,
            "--quick" => a.ops = 50_000,
            "--concurrency" => a.concurrency = num("--concurrency", value())?,
            "--http-concurrency" => a.http_concurrency = num("--http-concurrency", value())?,
            "--batch" => a.batch = num("--batch", value())?,
            "--batch-concurrency" => a.batch_concurrency = num("--batch-concurrency", value())?,
            "--only" => {
                let v = value().ok_or_else(|| anyhow!("--only needs a value"))?;
                a.library = false;
                a.http = false;
                a.verify = false;
                for w in v.split(',') {
                    match w.trim() {
                        "library" => a.library = true,
                        "http" => a.http = true,
                        "verify" => a.verify = true,
                        other => bail!("--only: unknown workload group {other:?} (library, http, verify)"),
                    }
                }
            }
            "--json" => a.json = Some(value().ok_or_else(|| anyhow!("--json needs a path"))?.into()),
            "--node-bin" => a.node_bin = Some(value().ok_or_else(|| anyhow!("--node-bin needs a path"))?.into()),
            // `cargo bench` passes `--bench` to harness-less benches.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    if a.ops == 0 || a.concurrency == 0 || a.http_concurrency == 0 || a.batch == 0 || a.batch_concurrency == 0 {
        bail!("--ops, --concurrency, --http-concurrency, --batch and --batch-concurrency must be > 0");
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Default, Clone, serde::Serialize)]
struct Row {
    workload: String,
    ops: u64,
    /// Calls made (puts, batches or requests): what the latencies are per.
    calls: u64,
    seconds: f64,
    ops_per_sec: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// Resident set of the process holding the node after the run, KiB (VmRSS).
    rss_kib: Option<u64>,
    /// Peak resident set of that process, KiB (VmHWM).
    hwm_kib: Option<u64>,
    goal: String,
    goal_met: Option<bool>,
    /// CPU time (user + system) of the process holding the node during the run, seconds. For the
    /// library runs that process is the bench itself, so it includes the client tasks.
    node_cpu_s: Option<f64>,
    /// CPU time of the bench process (the HTTP clients) during an HTTP run, seconds.
    client_cpu_s: Option<f64>,
    /// Size of the node's database file after the run, bytes.
    db_bytes: Option<u64>,
    /// Group commits (each one fsync) the node made for the run, from its metrics.
    commits: Option<u64>,
    note: String,
}

impl Row {
    /// The fields every throughput workload fills the same way; the caller adds what it measured
    /// besides (commits, database size, CPU, RSS).
    fn measured(
        workload: &str,
        ops: u64,
        calls: u64,
        seconds: f64,
        latencies_us: Vec<u32>,
        goal: f64,
        note: String,
    ) -> Row {
        let (p50, p99) = percentiles(latencies_us);
        let ops_per_sec = ops as f64 / seconds;
        Row {
            workload: workload.into(),
            ops,
            calls,
            seconds,
            ops_per_sec,
            p50_ms: p50,
            p99_ms: p99,
            goal: format!(">= {}k ops/s", goal / 1000.0),
            goal_met: Some(ops_per_sec >= goal),
            note,
            ..Default::default()
        }
    }
}

/// Latencies in microseconds, one per call.
fn percentiles(mut lat: Vec<u32>) -> (Option<f64>, Option<f64>) {
    if lat.is_empty() {
        return (None, None);
    }
    lat.sort_unstable();
    let at = |q: f64| {
        let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    (Some(at(0.50)), Some(at(0.99)))
}

/// (VmRSS, VmHWM) in KiB of a process (`self` or a pid).
/// CPU time (utime + stime) of a process (`self` or a pid), seconds.
fn cpu_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

fn cpu_delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

fn rss_of(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn db_size(data_dir: &Path) -> Option<u64> {
    std::fs::metadata(data_dir.join(peersync::node::DATABASE_FILE)).ok().map(|m| m.len())
}

fn value_100b(i: u64) -> Vec<u8> {
    // Printable, so the same bytes work as a JSON string in the HTTP batch body.
    let mut v = format!("v{i:012}-").into_bytes();
    v.resize(VALUE_BYTES, b'x');
    v
}

fn key(prefix: &str, i: u64) -> String {
    format!("{prefix}{i:010}")
}

// ---------------------------------------------------------------------------------------------
// Library workloads

async fn start_node(dir: &Path) -> Result<Node> {
    let config = NodeConfig::local(dir);
    Node::start(config).await.context("starting the node")
}

/// Starts `workers` tasks that take the indexes `0..count` from a shared counter and time `call(i)`
/// for each; every task returns its latencies in microseconds.
fn timed_workers<F, Fut>(workers: usize, count: u64, call: F) -> Vec<tokio::task::JoinHandle<Result<Vec<u32>>>>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    (0..workers)
        .map(|_| {
            let (next, call) = (next.clone(), call.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity((count as usize / workers.max(1)).max(16));
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let t = Instant::now();
                    call(i).await?;
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                anyhow::Ok(lat)
            })
        })
        .collect()
}

/// Waits for the workers of a workload.
async fn latencies(tasks: Vec<tokio::task::JoinHandle<Result<Vec<u32>>>>, calls: u64) -> Result<Vec<u32>> {
    let mut lat = Vec::with_capacity(calls as usize);
    for t in tasks {
        lat.extend(t.await??);
    }
    Ok(lat)
}

async fn library_single(args: &Args) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let node = start_node(dir.path()).await?;
    let handle = node.handle();
    let n = args.ops;
    let max_seq = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_of("self");
    let start = Instant::now();
    let tasks = timed_workers(args.concurrency, n, {
        let (handle, max_seq) = (handle.clone(), max_seq.clone());
        move |i| {
            let (handle, max_seq) = (handle.clone(), max_seq.clone());
            async move {
                let r = handle.put(REGISTER, key("k", i), value_100b(i)).await?;
                max_seq.fetch_max(r.seq, Ordering::Relaxed);
                Ok(())
            }
        }
    });
    let lat = latencies(tasks, n).await?;
    let max_seq = max_seq.load(Ordering::Relaxed);
    if max_seq != n {
        bail!("library-single: expected {n} ops, last seq {max_seq}");
    }
    let note = format!("{} tasks, latency per put", args.concurrency);
    finish_library(LibraryRun { workload: "library-single", ops: n, calls: n, start, cpu0, lat, note }, node, dir).await
}

async fn library_batch(args: &Args) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let node = start_node(dir.path()).await?;
    let handle = node.handle();
    let n = args.ops;
    let b = args.batch as u64;
    let batches = n.div_ceil(b);
    let cpu0 = cpu_of("self");
    let start = Instant::now();
    let tasks = timed_workers(args.batch_concurrency, batches, move |bi| {
        let handle = handle.clone();
        async move {
            let first = bi * b;
            let entries: Vec<(Vec<u8>, Vec<u8>)> =
                (first..(first + b).min(n)).map(|i| (key("b", i).into_bytes(), value_100b(i))).collect();
            handle.put_batch(REGISTER, entries).await?;
            Ok(())
        }
    });
    let lat = latencies(tasks, batches).await?;
    let note = format!("{} tasks x {b}/batch, latency per batch", args.batch_concurrency);
    finish_library(LibraryRun { workload: "library-batch", ops: n, calls: batches, start, cpu0, lat, note }, node, dir)
        .await
}

/// What a library workload measured.
struct LibraryRun {
    workload: &'static str,
    ops: u64,
    calls: u64,
    start: Instant,
    cpu0: Option<f64>,
    lat: Vec<u32>,
    note: String,
}

/// Stops the in-process node, checks it logged every op, and builds the row.
async fn finish_library(run: LibraryRun, node: Node, dir: tempfile::TempDir) -> Result<Row> {
    let secs = run.start.elapsed().as_secs_f64();
    let node_cpu_s = cpu_delta(run.cpu0, cpu_of("self"));
    let handle = node.handle();
    let log_ops = handle.store().log_len()?;
    // Commit events reach the metrics through a task: let the last ones land.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let commits = handle.metrics().commits.get();
    drop(handle);
    node.shutdown().await;
    let db_bytes = db_size(dir.path());
    let n = run.ops;
    if log_ops != n {
        bail!("{}: expected {n} ops in the log, found {log_ops}", run.workload);
    }
    let row = Row::measured(run.workload, n, run.calls, secs, run.lat, GOAL_LIBRARY, run.note);
    Ok(Row { commits: Some(commits), db_bytes, node_cpu_s, ..row })
}

// ---------------------------------------------------------------------------------------------
// HTTP workloads: the release binary as a separate process

/// A node process; killed (by its pid) when dropped, on success and on every error path.
struct NodeProcess {
    child: Child,
    api: String,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn spawn(bin: &Path) -> Result<NodeProcess> {
        let dir = tempfile::tempdir()?;
        let log = std::fs::File::create(dir.path().join("node.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("node")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--api", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .env("RUST_LOG", std::env::var("PEERSYNC_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        // If the bench dies (panic, Ctrl-C, kill), the node dies with it.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning {}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        // Read the `api: http://...` line on a thread, so a silent node cannot hang the bench.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            // Keep draining until the node exits, so it never writes into a closed pipe.
            while let Some(Ok(line)) = lines.next() {
                if !sent {
                    if let Some(url) = line.strip_prefix("api: ") {
                        let _ = tx.send(url.trim().to_owned());
                        sent = true;
                    }
                }
            }
        });
        let mut proc = NodeProcess { child, api: String::new(), _dir: dir };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(api) => proc.api = api,
            Err(_) => {
                let log = std::fs::read_to_string(proc._dir.path().join("node.log")).unwrap_or_default();
                bail!("the node printed no `api:` line within 30 s; its log:\n{log}");
            }
        }
        Ok(proc)
    }

    /// SIGTERM by pid, then SIGKILL if it has not exited within 10 s.
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn node_bin(args: &Args) -> Result<PathBuf> {
    let bin = match &args.node_bin {
        Some(p) => p.clone(),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
            target.join("release").join("peersync")
        }
    };
    if !bin.is_file() {
        bail!(
            "{} not found: run `cargo build --release --bin peersync` first (scripts/bench-write.sh does)",
            bin.display()
        );
    }
    Ok(bin)
}

fn http_client(pool: usize) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .pool_idle_timeout(Duration::from_secs(300))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()?)
}

/// The node's group-commit counter from `/metrics` (best effort: `None` if not found).
async fn commits_of(client: &reqwest::Client, api: &str) -> Option<u64> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = client.get(format!("{api}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.split_once(' ')?;
            name.ends_with("commits_total").then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .map(|v| v as u64)
}

async fn log_ops_of(client: &reqwest::Client, api: &str) -> Result<u64> {
    let status: serde_json::Value =
        client.get(format!("{api}/v1/status")).send().await?.error_for_status()?.json().await?;
    status["log_ops"].as_u64().ok_or_else(|| anyhow!("/v1/status has no log_ops: {status}"))
}

async fn http_single(args: &Args, bin: &Path) -> Result<Row> {
    let mut node = NodeProcess::spawn(bin)?;
    let client = http_client(args.http_concurrency)?;
    let n = args.ops;
    let base = format!("{}/v1/registers/{REGISTER}/", node.api);
    let (node_cpu0, client_cpu0) = (cpu_of(&node.pid()), cpu_of("self"));
    let start = Instant::now();
    let tasks = timed_workers(args.http_concurrency, n, {
        let client = client.clone();
        move |i| {
            let (client, url) = (client.clone(), format!("{base}{}", key("h", i)));
            async move {
                let resp = client.put(url.as_str()).body(value_100b(i)).send().await?;
                let status = resp.status();
                let body = resp.bytes().await?;
                if !status.is_success() {
                    bail!("PUT {url}: {status}: {}", String::from_utf8_lossy(&body));
                }
                Ok(())
            }
        }
    });
    let run =
        HttpRun { workload: "http-single", ops: n, calls: n, goal: GOAL_HTTP_SINGLE, start, node_cpu0, client_cpu0 };
    let note = format!("{} keep-alive clients, latency per request", args.http_concurrency);
    finish_http(run, &mut node, &client, tasks, note).await
}

fn batch_body(first: u64, last: u64) -> Vec<u8> {
    let mut s = String::with_capacity(((last - first) as usize) * (VALUE_BYTES + 40) + 16);
    s.push_str("{\"entries\":[");
    for i in first..last {
        if i != first {
            s.push(',');
        }
        s.push_str("{\"key\":\"");
        s.push_str(&key("j", i));
        s.push_str("\",\"value\":\"");
        s.push_str(std::str::from_utf8(&value_100b(i)).expect("ascii value"));
        s.push_str("\"}");
    }
    s.push_str("]}");
    s.into_bytes()
}

async fn http_batch(args: &Args, bin: &Path) -> Result<Row> {
    let mut node = NodeProcess::spawn(bin)?;
    let client = http_client(args.batch_concurrency)?;
    let n = args.ops;
    let b = args.batch as u64;
    let batches = n.div_ceil(b);
    let url = format!("{}/v1/registers/{REGISTER}", node.api);
    let (node_cpu0, client_cpu0) = (cpu_of(&node.pid()), cpu_of("self"));
    let start = Instant::now();
    let tasks = timed_workers(args.batch_concurrency, batches, {
        let client = client.clone();
        move |bi| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let first = bi * b;
                let body = batch_body(first, (first + b).min(n));
                let resp =
                    client.post(url.as_str()).header("content-type", "application/json").body(body).send().await?;
                let status = resp.status();
                let text = resp.bytes().await?;
                if !status.is_success() {
                    bail!("POST {url}: {status}: {}", String::from_utf8_lossy(&text));
                }
                Ok(())
            }
        }
    });
    let run = HttpRun {
        workload: "http-batch",
        ops: n,
        calls: batches,
        goal: GOAL_HTTP_BATCH,
        start,
        node_cpu0,
        client_cpu0,
    };
    let note = format!("{} clients x {b}/request, latency per request", args.batch_concurrency);
    finish_http(run, &mut node, &client, tasks, note).await
}

/// What an HTTP workload measured before its clients finished.
struct HttpRun {
    workload: &'static str,
    ops: u64,
    calls: u64,
    goal: f64,
    start: Instant,
    node_cpu0: Option<f64>,
    client_cpu0: Option<f64>,
}

/// Waits for the clients, stops the node, checks the node logged every op, and builds the row.
async fn finish_http(
    run: HttpRun,
    node: &mut NodeProcess,
    client: &reqwest::Client,
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<u32>>>>,
    note: String,
) -> Result<Row> {
    let lat = latencies(tasks, run.calls).await?;
    let secs = run.start.elapsed().as_secs_f64();
    let node_cpu_s = cpu_delta(run.node_cpu0, cpu_of(&node.pid()));
    let client_cpu_s = cpu_delta(run.client_cpu0, cpu_of("self"));
    let rss = rss_of(&node.pid());
    let log_ops = log_ops_of(client, &node.api).await?;
    let commits = commits_of(client, &node.api).await;
    node.stop();
    let db_bytes = db_size(&node._dir.path().join("data"));
    let n = run.ops;
    if log_ops != n {
        bail!("{}: expected {n} ops in the node's log, found {log_ops}", run.workload);
    }
    let row = Row::measured(run.workload, n, run.calls, secs, lat, run.goal, note);
    Ok(Row { rss_kib: rss.map(|r| r.0), hwm_kib: rss.map(|r| r.1), commits, db_bytes, node_cpu_s, client_cpu_s, ..row })
}

// ---------------------------------------------------------------------------------------------
// Verification of signed op batches

fn verify_bench() -> Result<Row> {
    let signer = Signer::new(libp2p::identity::Keypair::generate_ed25519());
    let origin = signer.origin();
    let mut batches = Vec::new();
    let mut chain = ChainHash::GENESIS;
    let mut seq = 0u64;
    while seq < VERIFY_OPS {
        let prev = chain;
        let after = Seq(seq);
        let mut ops = Vec::with_capacity(VERIFY_BATCH as usize);
        while seq < VERIFY_OPS && (seq - after.0) < VERIFY_BATCH {
            seq += 1;
            let op = Op {
                origin,
                seq: Seq(seq),
                hlc: Hlc::new(1_700_000_000_000 + seq, 0),
                body: OpBody::RegisterPut {
                    register: REGISTER.into(),
                    key: key("v", seq).into_bytes(),
                    value: value_100b(seq),
                },
            };
            let bytes = op.encode();
            chain = chain.extend(blake3::hash(&bytes).as_bytes());
            ops.push(ByteBuf::from(bytes));
        }
        batches.push((prev, OpBatch { after, ops, head: signer.sign_head(Seq(seq), chain) }));
    }
    let count = batches.len();
    let start = Instant::now();
    let mut verified = 0u64;
    for (prev, batch) in batches {
        let v = batch.verify(prev, VERIFY_BATCH as usize).map_err(|e| anyhow!("verify: {e}"))?;
        verified += v.ops.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    if verified != VERIFY_OPS {
        bail!("verify: {verified} ops verified, expected {VERIFY_OPS}");
    }
    Ok(Row {
        workload: "verify".into(),
        ops: VERIFY_OPS,
        calls: count as u64,
        seconds: secs,
        ops_per_sec: VERIFY_OPS as f64 / secs,
        goal: format!("< {GOAL_VERIFY_MS} ms / 100k"),
        goal_met: Some(secs * 1000.0 < GOAL_VERIFY_MS),
        note: format!("{count} batches of {VERIFY_BATCH} signed heads, 1 thread, {:.1} ms total", secs * 1000.0),
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------------------------

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|v| if v < 10.0 { format!("{v:.2}") } else { format!("{v:.1}") }).unwrap_or_else(|| "-".into())
}

fn fmt_mib(v: Option<u64>) -> String {
    v.map(|k| format!("{:.0}", k as f64 / 1024.0)).unwrap_or_else(|| "-".into())
}

fn print_table(rows: &[Row], lib_rss: Option<(u64, u64)>) {
    println!();
    println!(
        "{:<15} {:>9} {:>8} {:>11} {:>9} {:>9} {:>8} {:>8}  {:<22} met",
        "workload", "ops", "seconds", "ops/s", "p50 ms", "p99 ms", "RSS MiB", "HWM MiB", "goal"
    );
    println!("{}", "-".repeat(112));
    for r in rows {
        println!(
            "{:<15} {:>9} {:>8.2} {:>11.0} {:>9} {:>9} {:>8} {:>8}  {:<22} {}",
            r.workload,
            r.ops,
            r.seconds,
            r.ops_per_sec,
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms),
            fmt_mib(r.rss_kib),
            fmt_mib(r.hwm_kib),
            r.goal,
            match r.goal_met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
    println!();
    for r in rows {
        let commits = match r.commits {
            Some(c) if c > 0 => format!(
                "; {c} commits, {:.0} ops/commit, {:.2} ms/commit",
                r.ops as f64 / c as f64,
                r.seconds * 1000.0 / c as f64
            ),
            _ => String::new(),
        };
        let db = r.db_bytes.map(|b| format!("; db file {:.0} MiB", b as f64 / (1 << 20) as f64)).unwrap_or_default();
        let cpu = match (r.node_cpu_s, r.client_cpu_s) {
            (Some(n), Some(c)) => format!("; cpu: node {n:.1} s, clients {c:.1} s"),
            (Some(n), None) => format!("; cpu {n:.1} s"),
            _ => String::new(),
        };
        println!("  {:<15} {}{commits}{db}{cpu}", r.workload, r.note);
    }
    if let Some((rss, hwm)) = lib_rss {
        println!(
            "  library runs: RSS/HWM are of the bench process itself (node in-process): {:.0} / {:.0} MiB",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
    println!("  http runs: RSS/HWM are of the node process after its run");
    println!(
        "  host: {} cores; client and node share them",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    // Fail early, before the library runs, if the HTTP runs cannot happen.
    let bin = if args.http { Some(node_bin(&args)?) } else { None };
    println!(
        "peersync write bench: {} ops of {VALUE_BYTES}-byte values, concurrency {}, http concurrency {}, batch {} x {} tasks",
        args.ops, args.concurrency, args.http_concurrency, args.batch, args.batch_concurrency
    );
    let mut rows = Vec::new();
    let mut lib_rss = None;
    let report = |row: Row, rows: &mut Vec<Row>| {
        println!(
            "{:<15} {:>9} ops in {:>7.2} s = {:>9.0} ops/s  p50 {} ms  p99 {} ms",
            row.workload,
            row.ops,
            row.seconds,
            row.ops_per_sec,
            fmt_ms(row.p50_ms),
            fmt_ms(row.p99_ms)
        );
        rows.push(row);
    };
    if args.library {
        report(library_single(&args).await?, &mut rows);
        report(library_batch(&args).await?, &mut rows);
        lib_rss = rss_of("self");
        if let Some((rss, hwm)) = lib_rss {
            for r in rows.iter_mut() {
                r.rss_kib = Some(rss);
                r.hwm_kib = Some(hwm);
            }
        }
    }
    if let Some(bin) = &bin {
        report(http_single(&args, bin).await?, &mut rows);
        report(http_batch(&args, bin).await?, &mut rows);
    }
    if args.verify {
        let row = tokio::task::spawn_blocking(verify_bench).await??;
        report(row, &mut rows);
    }
    print_table(&rows, lib_rss);
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "ops": args.ops,
            "value_bytes": VALUE_BYTES,
            "concurrency": args.concurrency,
            "http_concurrency": args.http_concurrency,
            "batch": args.batch,
            "batch_concurrency": args.batch_concurrency,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "library_process_rss_kib": lib_rss.map(|r| r.0),
            "library_process_hwm_kib": lib_rss.map(|r| r.1),
            "results": rows,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("  results written to {}", path.display());
    }
    Ok(())
}
