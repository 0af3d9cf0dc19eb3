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

/// Length of a container ID in hex digits.
const ID_LEN: usize = 64;

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
