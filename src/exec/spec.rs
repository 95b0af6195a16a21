//! Turning a protocol `ExecSpec` into something safe to spawn: who runs it, where, with
//! which environment, and which file. Everything that can be checked before `fork` is
//! checked here, so errors name the problem instead of surfacing as a bare errno.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;

use super::ExecError;
use crate::proto::ExecSpec;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const DEFAULT_TERM: &str = "xterm-256color";

/// A user from `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// A passwd file larger than this is not one (even a big directory-synced one is far
/// smaller).
pub const MAX_PASSWD_BYTES: u64 = 16 * 1024 * 1024;

/// Looks a user up by name or numeric uid in a passwd file. An unusable passwd file
/// (missing, not a regular file, too large) reads as empty: see [`try_lookup_user`].
pub fn lookup_user(passwd: &Path, user: &str) -> Option<User> {
    match try_lookup_user(passwd, user) {
        Ok(found) => found,
        Err(_) => user.parse().ok().map(bare_uid),
    }
}

/// As [`lookup_user`], but a passwd file that exists and cannot be used is an error
/// naming it (read through [`crate::envfile`], so a FIFO there cannot hang us). A
/// missing file finds only bare uids.
pub fn try_lookup_user(
    passwd: &Path,
    user: &str,
) -> Result<Option<User>, crate::envfile::EnvFileError> {
    let text = match crate::envfile::read_bounded(passwd, "passwd file", MAX_PASSWD_BYTES) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.is_missing() => String::new(),
        Err(e) => return Err(e),
    };
    let by_uid: Option<u32> = user.parse().ok();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
            continue;
        };
        if f[0] == user || by_uid == Some(uid) {
            return Ok(Some(User {
                name: f[0].into(),
                uid,
                gid,
                home: f[5].into(),
                shell: f[6].into(),
            }));
        }
    }
    Ok(by_uid.map(bare_uid))
}

/// A bare uid that has no passwd entry is still a valid identity to run as.
fn bare_uid(uid: u32) -> User {
    User {
        name: uid.to_string(),
        uid,
        gid: uid,
        home: "/".into(),
        shell: "/bin/sh".into(),
    }
}

impl User {
    /// uid 0, or gid 0: root's group owns system files that are group-writable or
    /// group-readable only for it, so a session in it is as good as root for them.
    pub fn is_root(&self) -> bool {
        self.uid == 0 || self.gid == 0
    }
}

/// What the exec policy allows, fixed at boot.
#[derive(Debug, Clone)]
pub struct ExecPolicy {
    pub workspace: PathBuf,
    pub default_user: User,
    pub allow_root: bool,
    /// Whether the supervisor can switch users (it runs as root).
    pub privileged: bool,
    pub passwd: PathBuf,
}

/// A validated, resolved spec.
#[derive(Debug)]
pub struct Resolved {
    pub program: PathBuf,
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    pub user: User,
    /// `None` = keep the supervisor's own identity (not root).
    pub switch_user: bool,
}

pub fn resolve(spec: &ExecSpec, policy: &ExecPolicy) -> Result<Resolved, ExecError> {
    if spec.argv.is_empty() || spec.argv[0].is_empty() {
        return Err(ExecError::EmptyArgv);
    }
    for (index, a) in spec.argv.iter().enumerate() {
        if a.contains('\0') {
            return Err(ExecError::NulInArgument { index });
        }
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ExecError::BadEnv { name: k.clone() });
        }
    }

    let user = resolve_user(&spec.user, policy)?;
    let cwd = if spec.cwd.is_empty() {
        policy.workspace.clone()
    } else {
        policy.workspace.join(&spec.cwd)
    };

    // The clean base environment; the request's variables go on top.
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), user.home.clone()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("SHELL".into(), user.shell.clone()),
        ("PWD".into(), cwd.to_string_lossy().into_owned()),
    ];
    if let Some(tty) = &spec.tty {
        let term = if tty.term.is_empty() {
            DEFAULT_TERM
        } else {
            tty.term.as_str()
        };
        env.push(("TERM".into(), term.into()));
    }
    for (k, v) in &spec.env {
        match env.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    // The paths are checked with the session user's access, not root's: as root every
    // path is visible, and "not a directory" for a root-only file, or "no execute
    // permission" for a binary behind a root-only directory, would tell the tenant that
    // it exists. As the user, such paths fail with EACCES like anything else they may
    // not see; what is left is what the user could find out anyway.
    let check = || -> Result<PathBuf, ExecError> {
        check_cwd(&cwd)?;
        find_program(&spec.argv[0], &path_var, &cwd)
    };
    let program = if policy.privileged && user.uid != 0 {
        match as_user(&user, &check) {
            Ok(checked) => checked?,
            Err(errno) => {
                // Better sessions with root's view of the paths than no sessions.
                if !USER_VIEW_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(event = "exec.user_view_unavailable", error = %errno, "cannot take the session user's file-system identity on a thread; working directories and programs are checked as root (a tenant may tell whether root-only paths exist)");
                }
                check()?
            }
        }
    } else {
        check()?
    };

    Ok(Resolved {
        program,
        argv: spec.argv.iter().map(OsString::from).collect(),
        env: env.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        cwd,
        switch_user: policy.privileged,
        user,
    })
}

fn resolve_user(requested: &str, policy: &ExecPolicy) -> Result<User, ExecError> {
    if requested.is_empty() {
        return Ok(policy.default_user.clone());
    }
    if !policy.privileged {
        // Without root we cannot switch; accept only a request for who we already are.
        let own_uid = nix::unistd::geteuid().as_raw();
        return match lookup_user(&policy.passwd, requested) {
            Some(u) if u.uid == own_uid => Ok(u),
            _ => Err(ExecError::CannotSwitchUser {
                user: requested.into(),
                own_uid,
            }),
        };
    }
    let user = lookup_user(&policy.passwd, requested).ok_or_else(|| ExecError::UnknownUser {
        user: requested.into(),
    })?;
    if user.is_root() && !policy.allow_root {
        return Err(ExecError::RootNotAllowed {
            user: requested.into(),
        });
    }
    Ok(user)
}

fn check_cwd(cwd: &Path) -> Result<(), ExecError> {
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(ExecError::BadCwd {
            cwd: cwd.display().to_string(),
            why: "is not a directory".into(),
        }),
        Err(e) => Err(ExecError::BadCwd {
            cwd: cwd.display().to_string(),
            why: format!("cannot be used: {e}"),
        }),
    }
}

/// Runs `f` on this thread with `user`'s file-system identity: fsuid and fsgid set to
/// theirs, no supplementary groups (the child gets only its marker group, which owns no
/// files), then puts root's back. Changing the fsuid from 0 clears CAP_DAC_OVERRIDE and
/// the other file capabilities from the thread's effective set, so `stat` and `access`
/// answer as they will for the session. Credentials are per thread in the kernel; raw
/// syscalls keep glibc from applying the change to every thread. Sessions call this on
/// the spawner thread (`Sessions::open`), so no thread is made for it.
/// `Err(errno)`: the kernel (a sandboxing runtime, a seccomp filter) refused the
/// identity change, and `f` did not run.
fn as_user<T>(
    user: &User,
    f: &dyn Fn() -> Result<T, ExecError>,
) -> Result<Result<T, ExecError>, Errno> {
    let saved = nix::unistd::getgroups().unwrap_or_default();
    let mut switched = Switched::default();
    let outcome = switched.to(user.uid, user.gid).map(|()| f());
    if !switched.back(&saved) {
        // This thread would go on starting sessions with the tenant's view of the
        // files, or with root's groups lost: never carry on like that.
        eprintln!("sandbox-supervisor: cannot restore root's file-system identity after a path check; aborting");
        std::process::abort();
    }
    outcome
}

/// Which of this thread's credentials [`as_user`] changed, so exactly those go back
/// (a kernel without `setfsuid`, like older gVisor, changes none of them).
#[derive(Default)]
struct Switched {
    fsgid: bool,
    groups: bool,
    fsuid: bool,
}

/// `setfsuid`/`setfsgid` return the previous id and cannot report failure otherwise:
/// set, then read back with a second call (-1 as the id: ENOSYS or EPERM).
///
/// # Safety
/// A raw per-thread credential syscall (`SYS_setfsuid` or `SYS_setfsgid`).
unsafe fn set_fs_id(call: libc::c_long, id: u32) -> Result<(), Errno> {
    let before = libc::syscall(call, id);
    if before < 0 {
        return Err(Errno::last());
    }
    if libc::syscall(call, id) as u32 != id {
        return Err(Errno::EPERM);
    }
    Ok(())
}

impl Switched {
    fn to(&mut self, uid: u32, gid: u32) -> Result<(), Errno> {
        // SAFETY (whole block): raw syscalls that change only this thread's
        // credentials; the group list passed is empty (null, length 0).
        unsafe {
            // Probed first: where it is missing nothing has changed yet.
            set_fs_id(libc::SYS_setfsgid, gid)?;
            self.fsgid = true;
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
                return Err(Errno::last());
            }
            self.groups = true;
            set_fs_id(libc::SYS_setfsuid, uid)?;
            self.fsuid = true;
        }
        Ok(())
    }

    /// Puts root's back; whether everything changed is restored.
    fn back(&self, saved_groups: &[nix::unistd::Gid]) -> bool {
        // SAFETY (whole block): raw per-thread credential syscalls back to root's, the
        // group list read before the switch (pointer and length of a live slice).
        unsafe {
            (!self.fsuid || set_fs_id(libc::SYS_setfsuid, 0).is_ok())
                && (!self.groups
                    || libc::syscall(
                        libc::SYS_setgroups,
                        saved_groups.len(),
                        saved_groups.as_ptr().cast::<libc::gid_t>(),
                    ) == 0)
                && (!self.fsgid || set_fs_id(libc::SYS_setfsgid, 0).is_ok())
        }
    }
}

/// Logged once: the user-view check is not available here, paths are checked as root.
static USER_VIEW_WARNED: AtomicBool = AtomicBool::new(false);

/// Resolves argv[0] the way a shell would, but with errors that say what was searched.
fn find_program(name: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, ExecError> {
    if name.contains('/') {
        let p = cwd.join(name);
        return match std::fs::metadata(&p) {
            Ok(m) => check_executable(&p, &m).map(|_| p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ExecError::NotFound {
                name: name.into(),
                path: format!("(not searched: '{name}' contains '/')"),
            }),
            Err(e) => Err(ExecError::NotExecutable {
                path: p.display().to_string(),
                why: e.to_string(),
            }),
        };
    }
    let mut first_denied = None;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(dir)
        };
        let candidate = dir.join(name);
        if let Ok(m) = std::fs::metadata(&candidate) {
            match check_executable(&candidate, &m) {
                Ok(()) => return Ok(candidate),
                Err(e) => {
                    first_denied.get_or_insert(e);
                }
            }
        }
    }
    Err(first_denied.unwrap_or_else(|| ExecError::NotFound {
        name: name.into(),
        path: path_var.into(),
    }))
}

fn check_executable(path: &Path, meta: &std::fs::Metadata) -> Result<(), ExecError> {
    if meta.is_dir() {
        return Err(ExecError::NotExecutable {
            path: path.display().to_string(),
            why: "it is a directory".into(),
        });
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(ExecError::NotExecutable {
            path: path.display().to_string(),
            why: "no execute permission".into(),
        });
    }
    Ok(())
}

/// `KEY=VALUE` bytes for a resolved environment (used in tests and logs of names only).
pub fn env_names(env: &[(OsString, OsString)]) -> Vec<String> {
    env.iter()
        .map(|(k, _)| String::from_utf8_lossy(&k.clone().into_vec()).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path) -> ExecPolicy {
        ExecPolicy {
            workspace: dir.to_path_buf(),
            default_user: User {
                name: "sandbox".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/sandbox".into(),
                shell: "/bin/sh".into(),
            },
            allow_root: false,
            privileged: true,
            passwd: dir.join("passwd"),
        }
    }

    fn spec(argv: &[&str]) -> ExecSpec {
        ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn missing_program_names_it_and_the_path_searched() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve(&spec(&["no-such-program-xyz"]), &policy(dir.path())).unwrap_err();
        assert_eq!(err.code(), crate::proto::ErrorCode::NotFound);
        let msg = err.to_string();
        assert!(
            msg.contains("no-such-program-xyz") && msg.contains(DEFAULT_PATH),
            "{msg}"
        );
    }

    #[test]
    fn empty_argv_bad_cwd_and_root_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        let p = policy(dir.path());
        assert!(matches!(resolve(&spec(&[]), &p), Err(ExecError::EmptyArgv)));
        let mut s = spec(&["true"]);
        s.cwd = "nope".into();
        assert!(matches!(resolve(&s, &p), Err(ExecError::BadCwd { .. })));
        let mut s = spec(&["true"]);
        s.user = "root".into();
        assert!(matches!(
            resolve(&s, &p),
            Err(ExecError::RootNotAllowed { .. })
        ));
        s.user = "ghost".into();
        assert!(matches!(
            resolve(&s, &p),
            Err(ExecError::UnknownUser { .. })
        ));
    }

    #[test]
    fn paths_are_checked_with_the_session_users_access() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to check paths as another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir_all(private.join("sub")).unwrap();
        std::fs::write(private.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(private.join("tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut p = policy(dir.path());
        p.default_user.uid = 65534;
        p.default_user.gid = 65534;
        let message = |argv: &str, cwd: &str| {
            let mut s = spec(&[argv]);
            s.cwd = cwd.into();
            resolve(&s, &p).unwrap_err().to_string()
        };
        let at = |name: &str| private.join(name).display().to_string();
        // Root would see `sub` (a directory) and `tool` (executable); the user sees
        // neither, and cannot tell them from what does not exist.
        let (sub, none) = (
            message("/bin/true", &at("sub")),
            message("/bin/true", &at("none")),
        );
        assert_eq!(sub.replace("sub", "X"), none.replace("none", "X"));
        assert!(sub.contains("Permission denied"), "{sub}");
        let (tool, nope) = (message(&at("tool"), ""), message(&at("nope"), ""));
        assert_eq!(tool.replace("tool", "X"), nope.replace("nope", "X"));
        // Root's own view is unchanged, and the user still finds what they may see.
        p.default_user.uid = 0;
        p.default_user.gid = 0;
        p.allow_root = true;
        let mut s = spec(&["/bin/true"]);
        s.cwd = at("sub");
        assert!(resolve(&s, &p).is_ok());
        p.default_user.uid = 65534;
        p.default_user.gid = 65534;
        let started = std::time::Instant::now();
        for _ in 0..200 {
            resolve(&spec(&["true"]), &p).unwrap();
        }
        eprintln!(
            "resolve as another user: {:?} each",
            started.elapsed() / 200
        );
    }

    #[test]
    fn env_is_clean_and_request_overrides_base() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&["sh"]);
        s.env.insert("FOO".into(), "bar".into());
        s.env.insert("HOME".into(), "/elsewhere".into());
        let r = resolve(&s, &policy(dir.path())).unwrap();
        let get = |k: &str| {
            r.env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("FOO").as_deref(), Some("bar"));
        assert_eq!(get("HOME").as_deref(), Some("/elsewhere"));
        assert_eq!(get("USER").as_deref(), Some("sandbox"));
        assert!(get("SANDBOX_SUPERVISOR_GATEWAY").is_none());
        assert!(r.program.is_absolute());
    }
}
