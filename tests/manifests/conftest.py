"""Say where the CRDs came from, or why the schema tests skipped, even under -q."""

import manifest_checks as mc


def pytest_terminal_summary(terminalreporter):
    shared = mc.shared_dir()
    if shared is None:
        terminalreporter.write_line(
            "skipped: CRD schema validation: shared/crds not found (set SHARED_DIR or place "
            f"shared/ beside the repository at {mc.REPO_ROOT.parent / 'shared'})"
        )
    else:
        terminalreporter.write_line(f"manifests validated against the CRDs in {shared / 'crds'}")
