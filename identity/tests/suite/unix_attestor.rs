//! The `unix` workload attestor against this test process, a child process, and a fake
//! `/proc` in a temp dir; property tests for the `/proc/<pid>/stat` parser.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use writ_identity::attest::workload::{
    AttestError, Caller, SelectorDemand, SelectorTypes, StaticAttestor, UnixAttestor,
    WorkloadAttestor, parent_pid, parse_stat, process_start_time, read_stat, verify_start_time,
};
use writ_identity::selector::Selector;

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn strings(selectors: &[Selector]) -> Vec<String> {
    selectors.iter().map(ToString::to_string).collect()
}

fn values<'a>(selectors: &'a [Selector], prefix: &str) -> Vec<&'a str> {
    selectors
        .iter()
        .filter_map(|s| s.value().strip_prefix(prefix))
        .collect()
}

fn sha256_hex(path: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(path).unwrap()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// This process as the kernel would report it on the socket.
fn this_caller() -> Caller {
    Caller {
        pid: i32::try_from(std::process::id()).unwrap(),
        uid: writ_tests::uid(),
        gid: writ_tests::gid(),
    }
}

/// The name of `id` in a passwd-style file, read independently of the attestor.
fn name_in(file: &str, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[2] == id.to_string()).then(|| f[0].to_owned())
    })
}

/// A stat line as the kernel writes it, with `comm`, `ppid` and `start` in their places.
fn stat_line(pid: i32, comm: &str, ppid: i32, start: u64) -> String {
    let mut fields = vec![format!("{pid} ({comm}) S {ppid}")];
    // Fields 5..=21.
    fields.extend((5..=21).map(|i| (i * 7).to_string()));
    fields.push(start.to_string());
    // Fields 23..=52.
    fields.extend((23..=52).map(|i| i.to_string()));
    fields.join(" ") + "\n"
}

/// A fake `<root>/<pid>` with `stat`, `status` and an `exe` symlink to `exe`.
fn fake_process(root: &Path, pid: i32, stat: &[u8], status: &str, exe: &Path) {
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("stat"), stat).unwrap();
    std::fs::write(dir.join("status"), status).unwrap();
    std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
}

const STATUS: &str = "Name:\tworker\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t0\t0\t0\t0\n\
Gid:\t0\t0\t0\t0\nFDSize:\t64\nGroups:\t10 20 bogus 30 \nNStgid:\t4242\n";

const PASSWD: &str = "\
# comment:x:1234:1234:::
garbage line
short:x:1234
plus:x:+1234:0:::
+::::::
:x:1234:0:::
wrongcount:x:1234:0::::extra
carol:x:1234:1234:Carol:/home/carol:/bin/sh
second:x:1234:1234:Not first:/:/bin/sh
";

const GROUP: &str = "\
nonsense
staff:x:notanumber:
toomany:x:10::extra
wheel:x:10:carol
:x:20:
dev:x:30:carol,dave
devs-again:x:30:
carols:x:1234:
";

/// A fake proc root with process 4242 (comm full of parentheses and spaces), a small
/// executable, and passwd/group fixtures with malformed lines.
struct Fake {
    dir: tempfile::TempDir,
    exe: PathBuf,
}

impl Fake {
    const PID: i32 = 4242;

    fn new(stat: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("bin").join("worker (v2)");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        std::fs::write(&exe, b"#!/bin/sh\necho hello\n").unwrap();
        fake_process(&dir.path().join("proc"), Self::PID, stat, STATUS, &exe);
        std::fs::write(dir.path().join("passwd"), PASSWD).unwrap();
        std::fs::write(dir.path().join("group"), GROUP).unwrap();
        Self { dir, exe }
    }

    fn standard() -> Self {
        Self::new(stat_line(Self::PID, "a) b (c)) S 9 9", 77, 123_456).as_bytes())
    }

    fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    fn attestor(&self) -> UnixAttestor {
        UnixAttestor::builder()
            .proc_root(self.proc_root())
            .passwd_file(self.dir.path().join("passwd"))
            .group_file(self.dir.path().join("group"))
            .build()
    }

    fn caller() -> Caller {
        Caller {
            pid: Self::PID,
            uid: 1234,
            gid: 1234,
        }
    }
}

#[tokio::test]
async fn attests_this_process() {
    let caller = this_caller();
    let attestor = UnixAttestor::builder().max_hash_bytes(u64::MAX).build();
    let got = attestor.attest(&caller).await.unwrap();

    assert_eq!(values(&got, "uid:"), [caller.uid.to_string()]);
    assert_eq!(values(&got, "gid:"), [caller.gid.to_string()]);
    assert!(got.iter().all(|s| s.kind() == "unix"));
    match name_in("/etc/passwd", caller.uid) {
        Some(name) => assert_eq!(values(&got, "user:"), [name]),
        None => assert!(values(&got, "user:").is_empty()),
    }
    match name_in("/etc/group", caller.gid) {
        Some(name) => assert_eq!(values(&got, "group:"), [name]),
        None => assert!(values(&got, "group:").is_empty()),
    }

    let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    assert_eq!(values(&got, "path:"), [exe.to_str().unwrap()]);
    assert_eq!(values(&got, "sha256:"), [sha256_hex(&exe)]);

    // Supplementary groups as the kernel lists them.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let groups: Vec<String> = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut got_groups: Vec<String> = values(&got, "supplementary_gid:")
        .into_iter()
        .map(str::to_owned)
        .collect();
    got_groups.sort();
    let mut want_groups = groups;
    want_groups.sort();
    want_groups.dedup();
    assert_eq!(got_groups, want_groups);

    // Start time and parent against a naive read (this binary's name has no spaces).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.split_whitespace().collect();
    let root = attestor.proc_root();
    assert_eq!(
        process_start_time(root, caller.pid).unwrap().to_string(),
        fields[21]
    );
    assert_eq!(parent_pid(root, caller.pid).unwrap().to_string(), fields[3]);

    // Sorted, no duplicates; the blocking form agrees.
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(got, sorted);
    assert_eq!(attestor.attest_blocking(&caller).unwrap(), got);
}

#[tokio::test]
async fn uid_and_gid_come_from_the_caller_only() {
    let mut caller = this_caller();
    caller.uid = 4_000_000_001;
    caller.gid = 4_000_000_002;
    let got = UnixAttestor::builder()
        .max_hash_bytes(0)
        .build()
        .attest(&caller)
        .await
        .unwrap();
    assert_eq!(values(&got, "uid:"), ["4000000001"]);
    assert_eq!(values(&got, "gid:"), ["4000000002"]);
    assert!(values(&got, "user:").is_empty());
    assert!(values(&got, "group:").is_empty());
    // The limit of 0 bytes leaves the hash out, never the whole attestation.
    assert!(values(&got, "sha256:").is_empty());
    assert_eq!(values(&got, "path:").len(), 1);
}

fn sleep_binary() -> PathBuf {
    ["/usr/bin/sleep", "/bin/sleep"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("a sleep binary")
        .canonicalize()
        .unwrap()
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn attests_a_child_process_then_sees_it_gone() {
    let sleep = sleep_binary();
    let mut child = Reaped(Command::new(&sleep).arg("30").spawn().unwrap());
    let pid = i32::try_from(child.0.id()).unwrap();
    let me = this_caller();
    let caller = Caller { pid, ..me };
    let attestor = UnixAttestor::default();
    assert_eq!(attestor.proc_root(), Path::new("/proc"));

    let got = attestor.attest(&caller).await.unwrap();
    assert_eq!(values(&got, "path:"), [sleep.to_str().unwrap()]);
    assert_eq!(values(&got, "sha256:"), [sha256_hex(&sleep)]);
    assert_eq!(values(&got, "uid:"), [me.uid.to_string()]);

    let root = attestor.proc_root();
    assert_eq!(parent_pid(root, pid).unwrap(), me.pid);
    let start = process_start_time(root, pid).unwrap();
    assert!(start >= process_start_time(root, me.pid).unwrap());
    verify_start_time(root, pid, start).unwrap();
    assert!(matches!(
        verify_start_time(root, pid, start + 1),
        Err(AttestError::ProcessChanged { pid: p }) if p == pid
    ));

    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let err = attestor.attest(&caller).await.unwrap_err();
    assert!(
        matches!(err, AttestError::ProcessGone { pid: p } if p == pid),
        "{err:?}"
    );
    assert!(matches!(
        process_start_time(root, pid),
        Err(AttestError::ProcessGone { .. })
    ));
    assert!(matches!(
        verify_start_time(root, pid, start),
        Err(AttestError::ProcessGone { .. })
    ));
}

#[tokio::test]
async fn fake_proc_full_selector_set() {
    let fake = Fake::standard();
    let got = fake.attestor().attest(&Fake::caller()).await.unwrap();
    let exe = fake.exe.to_str().unwrap();
    let mut want = vec![
        "unix:uid:1234".to_owned(),
        "unix:gid:1234".to_owned(),
        // First well-formed line for the uid wins; malformed ones before it are skipped.
        "unix:user:carol".to_owned(),
        "unix:group:carols".to_owned(),
        "unix:supplementary_gid:10".to_owned(),
        "unix:supplementary_gid:20".to_owned(),
        "unix:supplementary_gid:30".to_owned(),
        "unix:supplementary_group:wheel".to_owned(),
        "unix:supplementary_group:dev".to_owned(),
        format!("unix:path:{exe}"),
        format!("unix:sha256:{}", sha256_hex(&fake.exe)),
    ];
    want.sort();
    assert_eq!(strings(&got), want);

    let root = fake.proc_root();
    assert_eq!(parent_pid(&root, Fake::PID).unwrap(), 77);
    assert_eq!(process_start_time(&root, Fake::PID).unwrap(), 123_456);
    let stat = read_stat(&root, Fake::PID).unwrap();
    assert_eq!(
        (stat.pid(), stat.ppid(), stat.start_time()),
        (4242, 77, 123_456)
    );
}

#[tokio::test]
async fn sha256_size_limit() {
    let fake = Fake::standard();
    let limited = UnixAttestor::builder()
        .proc_root(fake.proc_root())
        .max_hash_bytes(10)
        .build();
    let got = limited.attest(&Fake::caller()).await.unwrap();
    assert!(values(&got, "sha256:").is_empty(), "{got:?}");
    assert_eq!(values(&got, "path:"), [fake.exe.to_str().unwrap()]);

    // Exactly at the limit is hashed.
    let size = std::fs::metadata(&fake.exe).unwrap().len();
    let exact = UnixAttestor::builder()
        .proc_root(fake.proc_root())
        .max_hash_bytes(size)
        .build();
    let got = exact.attest(&Fake::caller()).await.unwrap();
    assert_eq!(values(&got, "sha256:"), [sha256_hex(&fake.exe)]);
}

/// Spawns `exe` with `args`, retrying while another test thread's fork briefly holds the
/// just-written file open for writing (ETXTBSY).
fn spawn_fresh(exe: &Path, args: &[&str]) -> Child {
    for _ in 0..50 {
        match Command::new(exe).args(args).spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(26) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("spawn {}: {e}", exe.display()),
        }
    }
    panic!("{} stayed busy", exe.display());
}

#[tokio::test]
async fn replaced_executable_cannot_fool_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("worker");
    std::fs::copy(sleep_binary(), &exe).unwrap();
    let original = sha256_hex(&exe);
    let mut child = Reaped(spawn_fresh(&exe, &["30"]));
    let caller = Caller {
        pid: i32::try_from(child.0.id()).unwrap(),
        ..this_caller()
    };
    let attestor = UnixAttestor::default();
    let got = attestor.attest(&caller).await.unwrap();
    assert_eq!(
        values(&got, "path:"),
        [exe.canonicalize().unwrap().to_str().unwrap()]
    );
    assert_eq!(values(&got, "sha256:"), [original.as_str()]);

    // Put another file at the same path: the running process is still the old one.
    let other = dir.path().join("other");
    std::fs::write(&other, b"#!/bin/sh\nexit 0\n").unwrap();
    std::fs::rename(&other, &exe).unwrap();
    assert_ne!(sha256_hex(&exe), original);
    let got = attestor.attest(&caller).await.unwrap();
    assert_eq!(values(&got, "sha256:"), [original.as_str()]);
    // The kernel now shows "<path> (deleted)": that names no file, so no path selector.
    assert!(values(&got, "path:").is_empty(), "{got:?}");
    child.0.kill().unwrap();
}

/// A demand as the agent's cache makes it, from the selectors of some entries.
#[derive(Debug)]
struct Entries(Vec<Vec<Selector>>);

impl SelectorDemand for Entries {
    fn wanted(&self, found: &[Selector], computed: &SelectorTypes) -> SelectorTypes {
        let mut out = SelectorTypes::default();
        for entry in &self.0 {
            if entry
                .iter()
                .all(|s| !computed.contains_type_of(s) || found.contains(s))
            {
                for s in entry.iter().filter(|s| !computed.contains_type_of(s)) {
                    out.insert_type_of(s);
                }
            }
        }
        out
    }
}

fn entries(list: &[&[&str]]) -> std::sync::Arc<dyn SelectorDemand> {
    std::sync::Arc::new(Entries(
        list.iter()
            .map(|e| e.iter().map(|s| sel(s)).collect())
            .collect(),
    ))
}

#[tokio::test]
async fn hashes_only_what_an_entry_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("worker");
    std::fs::copy(sleep_binary(), &exe).unwrap();
    let digest = sha256_hex(&exe);
    let child = Reaped(spawn_fresh(&exe, &["30"]));
    let caller = Caller {
        pid: i32::try_from(child.0.id()).unwrap(),
        ..this_caller()
    };
    let me = caller.uid;
    let stranger = me.wrapping_add(1);
    let attestor = UnixAttestor::default();
    let touch = || {
        // Read-only: a running executable cannot be opened for writing (ETXTBSY).
        let file = std::fs::File::open(&exe).unwrap();
        let later = std::fs::metadata(&exe).unwrap().modified().unwrap()
            + std::time::Duration::from_secs(1);
        file.set_modified(later).unwrap();
    };

    // No entry uses sha256 or path: 20 calls, each touching the binary first, hash nothing.
    let cheap = entries(&[&[&format!("unix:uid:{me}")]]);
    for _ in 0..20 {
        touch();
        let got = attestor.attest_for(&caller, cheap.clone()).await.unwrap();
        assert!(values(&got.selectors, "sha256:").is_empty());
        assert!(values(&got.selectors, "path:").is_empty());
        assert!(got.skipped.contains("unix", "sha256"), "{:?}", got.skipped);
        assert!(got.skipped.contains("unix", "path"));
        assert!(got.selectors.contains(&sel(&format!("unix:uid:{me}"))));
    }
    assert_eq!(attestor.hashes_computed(), 0);

    // A sha256 entry for another uid: this caller is a stranger to it, still no hash.
    let others = entries(&[&[
        &format!("unix:uid:{stranger}"),
        &format!("unix:sha256:{digest}"),
    ]]);
    for _ in 0..20 {
        touch();
        let got = attestor.attest_for(&caller, others.clone()).await.unwrap();
        assert!(values(&got.selectors, "sha256:").is_empty());
        assert!(got.skipped.contains("unix", "sha256"));
    }
    assert_eq!(attestor.hashes_computed(), 0);

    // A sha256 entry for this uid: hashed once, then from the cache while unchanged.
    let mine = entries(&[&[&format!("unix:uid:{me}"), &format!("unix:sha256:{digest}")]]);
    for _ in 0..20 {
        let got = attestor.attest_for(&caller, mine.clone()).await.unwrap();
        assert_eq!(values(&got.selectors, "sha256:"), [digest.as_str()]);
        assert!(!got.skipped.contains("unix", "sha256"));
    }
    assert_eq!(attestor.hashes_computed(), 1);
    // Touched: a new file identity, hashed again (once).
    touch();
    for _ in 0..5 {
        attestor.attest_for(&caller, mine.clone()).await.unwrap();
    }
    assert_eq!(attestor.hashes_computed(), 2);

    // Only the cheap selector an entry names is read: a `user` entry does not bring
    // `path` along; a `path` entry brings no hash.
    let by_path = entries(&[&[&format!("unix:uid:{me}"), "unix:path:/nonexistent/x"]]);
    let got = attestor.attest_for(&caller, by_path).await.unwrap();
    assert_eq!(
        values(&got.selectors, "path:"),
        [exe.canonicalize().unwrap().to_str().unwrap()]
    );
    // The path does not match the entry, so its sha256 (none here) is not wanted either.
    assert!(got.skipped.contains("unix", "sha256"));
    assert_eq!(attestor.hashes_computed(), 2);

    // `attest` (everything) still hashes, from the cache when unchanged.
    let all = attestor.attest(&caller).await.unwrap();
    assert_eq!(values(&all, "sha256:"), [digest.as_str()]);
    assert_eq!(attestor.hashes_computed(), 2);
    drop(child);
}

#[test]
fn concurrent_hashes_are_bounded_and_shared() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("worker");
    std::fs::copy(sleep_binary(), &exe).unwrap();
    let digest = sha256_hex(&exe);
    let child = Reaped(spawn_fresh(&exe, &["30"]));
    let caller = Caller {
        pid: i32::try_from(child.0.id()).unwrap(),
        ..this_caller()
    };
    let attestor = UnixAttestor::builder().max_concurrent_hashes(1).build();
    let demand = Entries(vec![vec![sel(&format!("unix:sha256:{digest}"))]]);
    // 8 callers of the same unchanged binary at once: one hash, the others wait for it
    // and take it from the cache.
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let got = attestor.attest_for_blocking(&caller, &demand).unwrap();
                assert_eq!(values(&got.selectors, "sha256:"), [digest.as_str()]);
            });
        }
    });
    assert_eq!(attestor.hashes_computed(), 1);
    drop(child);
}

#[tokio::test]
async fn missing_account_files_leave_names_out() {
    let fake = Fake::standard();
    let attestor = UnixAttestor::builder()
        .proc_root(fake.proc_root())
        .passwd_file(fake.dir.path().join("no-passwd"))
        .group_file(fake.dir.path().join("no-group"))
        .build();
    let got = attestor.attest(&Fake::caller()).await.unwrap();
    assert!(values(&got, "user:").is_empty());
    assert!(values(&got, "group:").is_empty());
    assert!(values(&got, "supplementary_group:").is_empty());
    assert_eq!(values(&got, "supplementary_gid:"), ["10", "20", "30"]);
}

#[tokio::test]
async fn malformed_stat_is_an_error() {
    for stat in [
        &b""[..],
        b"4242",
        b"4242 (worker S 1 2 3",
        b"4242 worker) S 1",
        b"4242 (worker) S",
        b"4242 (worker) S 1 2 3",
        b"4242 (worker) S x 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22",
        b"4242 (worker) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 -19",
        b"4242 (worker) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18",
        b"x (worker) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
        b")4242 (worker S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
        b"4242 (w)\xff S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    ] {
        let fake = Fake::new(stat);
        let err = fake
            .attestor()
            .attest(&Fake::caller())
            .await
            .expect_err(&String::from_utf8_lossy(stat));
        assert!(
            matches!(err, AttestError::MalformedStat { .. }),
            "{:?}: {err:?}",
            String::from_utf8_lossy(stat)
        );
        assert!(matches!(
            parse_stat(stat),
            Err(AttestError::MalformedStat { .. })
        ));
    }
    // The shortest good line: fields up to 22 (the start time, here 19) only.
    let ok = b"4242 (w) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19";
    let stat = parse_stat(ok).unwrap();
    assert_eq!((stat.pid(), stat.ppid(), stat.start_time()), (4242, 1, 19));
}

#[tokio::test]
async fn oversized_status_is_an_error() {
    let fake = Fake::standard();
    let status = fake.proc_root().join("4242").join("status");
    std::fs::write(&status, "Groups:\t1\n".repeat(10_000)).unwrap();
    let err = fake.attestor().attest(&Fake::caller()).await.unwrap_err();
    assert!(
        matches!(err, AttestError::FileTooLarge { max, .. } if max == 64 * 1024),
        "{err:?}"
    );
}

#[tokio::test]
async fn missing_or_reused_process() {
    let fake = Fake::standard();
    let root = fake.proc_root();
    let attestor = fake.attestor();

    let gone = Caller {
        pid: 999,
        ..Fake::caller()
    };
    assert!(matches!(
        attestor.attest(&gone).await,
        Err(AttestError::ProcessGone { pid: 999 })
    ));
    for pid in [0, -1, i32::MIN] {
        let bad = Caller {
            pid,
            ..Fake::caller()
        };
        assert!(matches!(
            attestor.attest(&bad).await,
            Err(AttestError::InvalidPid { pid: p }) if p == pid
        ));
    }

    // The checker run at the end of attestation: same start time passes, another fails.
    verify_start_time(&root, Fake::PID, 123_456).unwrap();
    assert!(matches!(
        verify_start_time(&root, Fake::PID, 123_455),
        Err(AttestError::ProcessChanged { pid: Fake::PID })
    ));
    assert!(matches!(
        verify_start_time(&root, 999, 123_456),
        Err(AttestError::ProcessGone { pid: 999 })
    ));

    // A process whose exe link is gone (a zombie) is gone.
    std::fs::remove_file(root.join("4242").join("exe")).unwrap();
    assert!(matches!(
        attestor.attest(&Fake::caller()).await,
        Err(AttestError::ProcessGone { pid: Fake::PID })
    ));
}

#[tokio::test]
async fn deleted_executable_keeps_hash_drops_path() {
    let fake = Fake::standard();
    let exe_link = fake.proc_root().join("4242").join("exe");
    // What the kernel shows for an unlinked executable.
    let shown = PathBuf::from(format!("{} (deleted)", fake.exe.display()));
    std::fs::copy(&fake.exe, &shown).unwrap();
    std::fs::remove_file(&exe_link).unwrap();
    std::os::unix::fs::symlink(&shown, &exe_link).unwrap();
    let got = fake.attestor().attest(&Fake::caller()).await.unwrap();
    assert!(values(&got, "path:").is_empty(), "{got:?}");
    assert_eq!(values(&got, "sha256:"), [sha256_hex(&shown)]);
}

#[tokio::test]
async fn static_attestor_for_tests() {
    let a = StaticAttestor::new(vec![sel("unix:uid:1")]).with_pid(7, vec![sel("unix:uid:7")]);
    let dynamic: &dyn WorkloadAttestor = &a;
    let c = |pid| Caller {
        pid,
        uid: 0,
        gid: 0,
    };
    assert_eq!(dynamic.attest(&c(7)).await.unwrap(), [sel("unix:uid:7")]);
    assert_eq!(dynamic.attest(&c(8)).await.unwrap(), [sel("unix:uid:1")]);
}

/// A command name as a process may set it: anything, with the troublesome characters
/// over-represented.
fn comm() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just(')'),
            Just('('),
            Just(' '),
            Just('\n'),
            Just('0'),
            any::<char>()
        ],
        0..40,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

proptest! {
    #[test]
    fn stat_round_trips(
        pid in 1..=i32::MAX,
        comm in comm(),
        ppid in 0..=i32::MAX,
        start in any::<u64>(),
    ) {
        let stat = parse_stat(stat_line(pid, &comm, ppid, start).as_bytes()).unwrap();
        prop_assert_eq!(stat.pid(), pid);
        prop_assert_eq!(stat.ppid(), ppid);
        prop_assert_eq!(stat.start_time(), start);
    }

    #[test]
    fn stat_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_stat(&bytes);
    }

    #[test]
    fn stat_mutations_never_panic(
        comm in comm(),
        start in any::<u64>(),
        cut in 0usize..400,
        junk in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let line = stat_line(42, &comm, 1, start).into_bytes();
        let cut = cut.min(line.len());
        let mut mutated = line[..cut].to_vec();
        mutated.extend_from_slice(&junk);
        mutated.extend_from_slice(&line[cut..]);
        // Whatever it answers, it does not panic, and a pid it accepts is positive.
        if let Ok(stat) = parse_stat(&mutated) {
            prop_assert!(stat.pid() > 0);
        }
    }

    #[test]
    fn fake_proc_comm_round_trips(comm in comm(), start in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("exe-target");
        std::fs::write(&exe, b"x").unwrap();
        fake_process(dir.path(), 77, stat_line(77, &comm, 5, start).as_bytes(), "", &exe);
        prop_assert_eq!(process_start_time(dir.path(), 77).unwrap(), start);
        prop_assert_eq!(parent_pid(dir.path(), 77).unwrap(), 5);
    }
}
