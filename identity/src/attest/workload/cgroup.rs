//! The container a process runs in, from its `/proc/<pid>/cgroup` lines: the first step
//! of the docker and Kubernetes workload attestors (issue 15).
//!
//! A line is `hierarchy-id:controllers:path` (cgroup v1) or `0::path` (v2). The runtimes
//! name the container's cgroup after its 64-hex-digit ID in a few shapes:
//!
//! | runtime | path ends in |
//! |---|---|
//! | Docker (cgroupfs) | `/docker/<id>` |
//! | Docker (systemd) | `/docker-<id>.scope` |
//! | containerd / CRI (cgroupfs) | `/kubepods/<qos>/pod<uid>/<id>` |
//! | containerd / CRI (systemd) | `.../cri-containerd-<id>.scope` |
//! | CRI-O | `.../crio-<id>.scope` (not `crio-conmon-<id>`, the monitor) |
//! | Podman | `.../libpod-<id>.scope` (optionally `/container` below it) |
//!
//! A nested container (Docker in Docker) is named by its innermost ID. Kubernetes paths
//! also carry the pod UID (`pod<uid>`, with `_` for `-` in systemd slice names).

use std::path::Path;

use super::AttestError;

/// Length of a container ID in hex digits.
const ID_LEN: usize = 64;

/// Most bytes read from `/proc/<pid>/cgroup`: a few hundred bytes per hierarchy, a
/// dozen hierarchies on cgroup v1. A larger file is refused.
pub const MAX_CGROUP_BYTES: u64 = 64 * 1024;

/// The container of process `pid`, from `<proc_root>/<pid>/cgroup` (read up to
/// [`MAX_CGROUP_BYTES`]). A process that is not in a container has an empty
/// [`ContainerInfo`]: that is not an error.
///
/// # Errors
/// [`AttestError::InvalidPid`] for a pid that is not positive, [`AttestError::ProcessGone`]
/// when the process has exited, [`AttestError::FileTooLarge`] past the limit, and
/// [`AttestError::Io`] when the file cannot be read.
pub fn container_of_pid(proc_root: &Path, pid: i32) -> Result<ContainerInfo, AttestError> {
    if pid <= 0 {
        return Err(AttestError::InvalidPid { pid });
    }
    let path = proc_root.join(pid.to_string()).join("cgroup");
    let bytes =
        writ_spiffe::process::read_bounded(&path, MAX_CGROUP_BYTES).map_err(|e| match e {
            writ_spiffe::process::ProcError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                AttestError::ProcessGone { pid }
            }
            other => AttestError::from(other),
        })?;
    Ok(container_info(&String::from_utf8_lossy(&bytes)))
}

/// What a process's cgroup lines say about its container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerInfo {
    /// The 64-hex-digit container ID, if the process is in a container.
    pub container_id: Option<String>,
    /// The Kubernetes pod UID, if the path names one.
    pub pod_uid: Option<String>,
}

/// Reads the container of a process from the text of its `/proc/<pid>/cgroup`. Lines
/// that are not in the cgroup format are skipped; when lines disagree, the last line
/// that names a container wins (v2's `0::` line comes last on hybrid hosts).
pub fn container_info(cgroup: &str) -> ContainerInfo {
    let mut info = ContainerInfo::default();
    for line in cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if let Some(id) = container_id_of(path) {
            info.container_id = Some(id);
        }
        if let Some(uid) = pod_uid_of(path) {
            info.pod_uid = Some(uid);
        }
    }
    info
}

/// The innermost container ID in one cgroup path.
fn container_id_of(path: &str) -> Option<String> {
    path.split('/').rev().find_map(|segment| {
        let name = segment.strip_suffix(".scope").unwrap_or(segment);
        if name.starts_with("crio-conmon-") {
            return None;
        }
        let id = ["docker-", "cri-containerd-", "crio-", "libpod-"]
            .iter()
            .find_map(|prefix| name.strip_prefix(prefix))
            .unwrap_or(name);
        is_container_id(id).then(|| id.to_owned())
    })
}

/// The pod UID in a Kubernetes cgroup path (`pod<uid>` or `kubepods-<qos>-pod<uid>.slice`).
fn pod_uid_of(path: &str) -> Option<String> {
    path.split('/').rev().find_map(|segment| {
        let name = segment.strip_suffix(".slice").unwrap_or(segment);
        let uid = name.rsplit_once("pod").map(|(_, uid)| uid)?;
        let uid = uid.replace('_', "-");
        is_uuid(&uid).then_some(uid)
    })
}

fn is_container_id(s: &str) -> bool {
    s.len() == ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f0b6e2b5c1d4a7e9f8c6b5a4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e";
    const OTHER: &str = "aa0b6e2b5c1d4a7e9f8c6b5a4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e";
    const POD: &str = "2c48913c-b29f-11e7-9350-020968147796";

    fn id(lines: &str) -> Option<String> {
        container_info(lines).container_id
    }

    #[test]
    fn runtimes_and_cgroup_versions() {
        let cases = [
            // Docker, cgroup v1 (cgroupfs driver).
            (
                format!("12:memory:/docker/{ID}\n11:cpu,cpuacct:/docker/{ID}"),
                Some(ID),
            ),
            // Docker, cgroup v2 with the systemd driver.
            (format!("0::/system.slice/docker-{ID}.scope"), Some(ID)),
            // containerd under Kubernetes, cgroupfs.
            (
                format!("3:cpu:/kubepods/besteffort/pod{POD}/{ID}"),
                Some(ID),
            ),
            // containerd under Kubernetes, systemd slices.
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
                    POD.replace('-', "_")
                ),
                Some(ID),
            ),
            // CRI-O, and its monitor process (not the container).
            (format!("0::/kubepods.slice/crio-{ID}.scope"), Some(ID)),
            (format!("0::/machine.slice/crio-conmon-{ID}.scope"), None),
            // Podman, rootful and rootless.
            (
                format!("0::/machine.slice/libpod-{ID}.scope/container"),
                Some(ID),
            ),
            (
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
                ),
                Some(ID),
            ),
            // Docker in Docker: the innermost container.
            (format!("4:pids:/docker/{OTHER}/docker/{ID}"), Some(ID)),
            // A host process.
            (
                "0::/user.slice/user-1000.slice/session-2.scope".to_owned(),
                None,
            ),
            ("12:memory:/\n0::/init.scope".to_owned(), None),
        ];
        for (lines, want) in cases {
            assert_eq!(id(&lines).as_deref(), want, "{lines}");
        }
    }

    /// Lines copied from real processes: a container of Docker 20.10 on a cgroup v1
    /// host with the cgroupfs driver (this project's CI machine: every hierarchy and the
    /// `0::` line name the container), and a host process on the same machine.
    #[test]
    fn real_lines() {
        let docker_v1 = "9:name=systemd:/docker/475fb92707b652f3b5095de773bc9d2e86dd2afec1f52f767413bd3294460d98
8:pids:/docker/475fb92707b652f3b5095de773bc9d2e86dd2afec1f52f767413bd3294460d98
7:blkio:/docker/475fb92707b652f3b5095de773bc9d2e86dd2afec1f52f767413bd3294460d98
4:memory:/docker/475fb92707b652f3b5095de773bc9d2e86dd2afec1f52f767413bd3294460d98
1:cpu:/docker/475fb92707b652f3b5095de773bc9d2e86dd2afec1f52f767413bd3294460d98
0::/docker/475fb92707b652f3b5095de773bc9d2e86dd2afec1f52f767413bd3294460d98
";
        assert_eq!(
            id(docker_v1).as_deref(),
            Some("475fb92707b652f3b5095de773bc9d2e86dd2afec1f52f767413bd3294460d98")
        );
        let host = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n0::/\n";
        assert_eq!(id(host), None);
        // Docker on a systemd cgroup v2 host (Debian 12, docker.io 20.10).
        let systemd_v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(id(&systemd_v2).as_deref(), Some(ID));
        // Docker's slice form with the systemd driver on cgroup v1.
        let systemd_v1 = format!("1:name=systemd:/system.slice/docker-{ID}.scope\n");
        assert_eq!(id(&systemd_v1).as_deref(), Some(ID));
    }

    #[test]
    fn container_of_pid_reads_a_bounded_file() {
        let dir = tempfile::tempdir().unwrap();
        let proc_dir = dir.path().join("42");
        std::fs::create_dir(&proc_dir).unwrap();
        std::fs::write(proc_dir.join("cgroup"), format!("0::/docker/{ID}\n")).unwrap();
        let info = container_of_pid(dir.path(), 42).unwrap();
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert!(matches!(
            container_of_pid(dir.path(), 43),
            Err(AttestError::ProcessGone { pid: 43 })
        ));
        assert!(matches!(
            container_of_pid(dir.path(), 0),
            Err(AttestError::InvalidPid { pid: 0 })
        ));
        let huge = "0::/x\n".repeat(20_000);
        std::fs::write(proc_dir.join("cgroup"), huge).unwrap();
        assert!(matches!(
            container_of_pid(dir.path(), 42),
            Err(AttestError::FileTooLarge { .. })
        ));
        // This test process: read through the real /proc, whatever it holds.
        let me = i32::try_from(std::process::id()).unwrap();
        container_of_pid(Path::new("/proc"), me).unwrap();
    }

    #[test]
    fn pod_uids_in_both_driver_shapes() {
        let cgroupfs = container_info(&format!("3:cpu:/kubepods/besteffort/pod{POD}/{ID}"));
        assert_eq!(cgroupfs.pod_uid.as_deref(), Some(POD));
        let systemd = container_info(&format!(
            "0::/kubepods.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
            POD.replace('-', "_")
        ));
        assert_eq!(systemd.pod_uid.as_deref(), Some(POD));
        assert_eq!(container_info(&format!("0::/docker/{ID}")).pod_uid, None);
    }

    proptest::proptest! {
        /// Any text: no panic, and an ID found is 64 lowercase hex digits that the text
        /// holds.
        #[test]
        fn any_text_gives_a_real_id_or_none(text in "(([0-9]{1,2}:[a-z,=]{0,12}:)?(/((docker-|crio-|libpod-|cri-containerd-|crio-conmon-)?[0-9a-fA-F]{62,66}(\\.scope)?|[a-z0-9_.@-]{0,20})){0,5}\n?){0,6}") {
            if let Some(id) = container_info(&text).container_id {
                proptest::prop_assert!(is_container_id(&id));
                proptest::prop_assert!(text.contains(&id));
            }
        }

        #[test]
        fn arbitrary_bytes_do_not_panic(text in ".{0,400}") {
            let _ = container_info(&text);
        }
    }

    #[test]
    fn garbage_names_no_container() {
        for lines in [
            "",
            "no colons at all",
            "1:cpu",
            &format!("0::/docker/{}", &ID[..63]),
            &format!("0::/docker/{}X", &ID[..63]),
            &format!("0::/docker/{}", ID.to_uppercase()),
            "0::/kubepods/podnot-a-uid/x",
        ] {
            assert_eq!(container_info(lines), ContainerInfo::default(), "{lines:?}");
        }
    }
}
