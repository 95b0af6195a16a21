use super::*;

#[test]
fn written_token_validates_and_has_the_kubelet_layout() {
    let iss = issuer();
    let pod = PodSpec::new("warm-0");
    let dir = tempfile::tempdir().unwrap();
    let token = iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap();
    write_projected(dir.path(), &token).unwrap();

    let read = SecretToken::new(std::fs::read_to_string(dir.path().join("token")).unwrap());
    let id = validator(&iss).validate(&read).unwrap();
    assert_eq!(id.pod_name, "warm-0");
    assert_eq!(id.pod_uid, pod.pod_uid);
    assert_eq!(id.namespace, "sandboxes");
    assert_eq!(id.service_account, "sandbox");

    use std::os::unix::fs::PermissionsExt;
    let leaf = std::fs::symlink_metadata(dir.path().join("token")).unwrap();
    assert!(leaf.file_type().is_symlink(), "token must be a symlink");
    assert_eq!(
        std::fs::read_link(dir.path().join("token")).unwrap(),
        std::path::Path::new("..data/token")
    );
    let data = std::fs::read_link(dir.path().join("..data")).unwrap();
    assert!(data.to_string_lossy().starts_with("..20"), "{data:?}");
    let mode = std::fs::metadata(dir.path().join("token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Each write swaps ..data; the generation before the previous one is removed.
    for _ in 0..2 {
        let t = iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap();
        write_projected(dir.path(), &t).unwrap();
    }
    let data3 = std::fs::read_link(dir.path().join("..data")).unwrap();
    assert_ne!(data, data3);
    assert!(!dir.path().join(&data).exists(), "old {data:?} left behind");
}

#[test]
fn token_stays_readable_throughout_rotation() {
    let iss = issuer();
    let pod = PodSpec::new("warm-1");
    let dir = tempfile::tempdir().unwrap();
    write_projected(
        dir.path(),
        &iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap(),
    )
    .unwrap();
    let path = dir.path().join("token");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut reads, mut errors) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match std::fs::read_to_string(&path) {
                    Ok(s) if s.split('.').count() == 3 => reads += 1,
                    Ok(s) => errors.push(format!("partial token of {} bytes", s.len())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (reads, errors)
        })
    };
    for _ in 0..300 {
        write_projected(
            dir.path(),
            &iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap(),
        )
        .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, errors) = reader.join().unwrap();
    assert!(
        errors.is_empty(),
        "reader saw errors during rotation: {errors:?}"
    );
    assert!(reads > 0);
    let dirs = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(
        dirs, 4,
        "expected ..data, token, the current and the previous generation"
    );
}

#[tokio::test]
async fn spawn_rotation_rewrites_until_stopped() {
    let iss = issuer();
    let dir = tempfile::tempdir().unwrap();
    let handle = iss
        .spawn_rotation(
            dir.path().to_path_buf(),
            PodSpec::new("rot"),
            AUD.into(),
            Duration::from_secs(600),
            Duration::from_millis(30),
        )
        .unwrap();
    let first = std::fs::read_link(dir.path().join("..data")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        handle.rotations() >= 3,
        "only {} rotations",
        handle.rotations()
    );
    assert_ne!(
        first,
        std::fs::read_link(dir.path().join("..data")).unwrap()
    );
    assert!(!std::fs::read_to_string(dir.path().join("token"))
        .unwrap()
        .is_empty());
    handle.stop();
    let target = std::fs::read_link(dir.path().join("..data")).unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        target,
        std::fs::read_link(dir.path().join("..data")).unwrap(),
        "rotation continued after stop"
    );
}

#[test]
fn bad_projected_tokens_are_rejected_precisely_without_leaking() {
    let iss = issuer();
    let other = issuer();
    let v = validator(&iss);
    let pod = PodSpec::new("warm-2");

    let mut c = iss.claims_for(&pod, AUD, Duration::from_secs(600));
    c.exp = c.iat - 60;
    let expired = iss.mint(&c).unwrap();
    let e = v.validate(&expired).unwrap_err();
    assert!(
        matches!(e, TokenError::Expired(s) if (59..=62).contains(&s)),
        "{e}"
    );
    assert!(
        e.to_string().contains("expired 60 s ago") || e.to_string().contains("expired 6"),
        "{e}"
    );
    assert_no_token_material(&e.to_string(), &expired);

    let wrong_aud = iss
        .mint_for(&pod, "kubernetes", Duration::from_secs(600))
        .unwrap();
    let e = v.validate(&wrong_aud).unwrap_err();
    assert_eq!(
        e.to_string().split(';').next().unwrap(),
        "audience is [\"kubernetes\"], want \"sandbox-gateway\""
    );
    assert_no_token_material(&e.to_string(), &wrong_aud);

    let foreign = other.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap();
    let e = v.validate(&foreign).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("signature does not verify against the issuer key"),
        "{e}"
    );
    assert_no_token_material(&e.to_string(), &foreign);

    let good = iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap();
    let tampered = tamper_signature(&good);
    assert_ne!(tampered, good);
    let e = v.validate(&tampered).unwrap_err();
    assert!(
        matches!(e, TokenError::Signature { .. } | TokenError::Malformed(_)),
        "{e}"
    );
    assert_no_token_material(&e.to_string(), &tampered);

    let mut c = iss.claims_for(&pod, AUD, Duration::from_secs(600));
    c.kubernetes_io.as_mut().unwrap().pod = None;
    let e = v.validate(&iss.mint(&c).unwrap()).unwrap_err();
    assert_eq!(e, TokenError::NoPodClaim);

    let e = v.validate(&SecretToken::new("not-a-jwt")).unwrap_err();
    assert!(matches!(e, TokenError::Malformed(_)), "{e}");
    assert!(!e.to_string().contains("not-a-jwt"));

    // Issuer key rotation: a validator with both keys accepts both issuers.
    let both = ProjectedValidator::new(
        &[
            other.public_key_pem().to_owned(),
            iss.public_key_pem().to_owned(),
        ],
        AUD,
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(both.validate(&foreign).is_ok());
    assert!(both.validate(&good).is_ok());
}

#[test]
fn sandbox_tokens_round_trip_and_expire() {
    let st = SandboxTokens::generate(Duration::from_secs(600)).unwrap();
    let (tok, exp_ms) = st.mint("sbx-1", "claim-1", "pod-1").unwrap();
    let c = st.validate(&tok).unwrap();
    assert_eq!(
        (
            c.sandbox_id.as_str(),
            c.claim_uid.as_str(),
            c.pod_uid.as_str()
        ),
        ("sbx-1", "claim-1", "pod-1")
    );
    assert_eq!(c.exp * 1000, exp_ms);
    let short = SandboxTokens::generate(Duration::from_secs(0)).unwrap();
    let (old, _) = short.mint("sbx-1", "claim-1", "pod-1").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let e = short.validate(&old).unwrap_err();
    assert!(e.to_string().starts_with("expired "), "{e}");
    // Another gateway's key does not verify.
    assert!(matches!(
        st.validate(&old),
        Err(TokenError::Signature { .. })
    ));
}

/// Tokens this gateway minted skip the signature check (a digest lookup), so an altered
/// token must still miss and be verified, and fail.
#[test]
fn an_altered_minted_token_is_still_refused() {
    let st = SandboxTokens::generate(Duration::from_secs(600)).unwrap();
    let (tok, _) = st.mint("sbx-1", "claim-1", "pod-1").unwrap();
    assert!(st.validate(&tok).is_ok());
    let parts: Vec<&str> = tok.expose().split('.').collect();
    // Same header and signature, claims for another sandbox.
    let forged_claims = tok
        .expose()
        .replacen(parts[1], &parts[1].replacen('e', "f", 1), 1);
    assert_ne!(forged_claims, tok.expose());
    let e = st.validate(&secret(forged_claims)).unwrap_err();
    assert!(
        matches!(e, TokenError::Signature { .. } | TokenError::Malformed(_)),
        "{e}"
    );
    let mut sig = tok.expose().to_owned();
    let last = sig.pop().unwrap();
    sig.push(if last == 'A' { 'B' } else { 'A' });
    assert!(st.validate(&secret(sig)).is_err());
}

fn secret(s: String) -> crate::identity::SecretToken {
    crate::identity::SecretToken::new(s)
}

#[test]
fn annotations_are_written_like_the_downward_api() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("annotations");
    let mut m = BTreeMap::new();
    m.insert("b/claim".to_owned(), "claim-\"1\"\n\\x\té".to_owned());
    m.insert("a".to_owned(), "plain".to_owned());
    write_annotations(&path, &m).unwrap();
    let body = std::fs::read_to_string(&path).unwrap();
    assert_eq!(body, "a=\"plain\"\nb/claim=\"claim-\\\"1\\\"\\n\\\\x\\té\"");
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_symlink());
}
