//! The nested harness itself, before `blkvm run` boots anything: L1 (QEMU
//! TCG, `-cpu max`) loads kvm-amd and has a `/dev/kvm` that runs guest
//! code (`kvm-smoke`), the packed `blkvm` runs there, and L1's script
//! helpers mark L2's console lines and report `blkvm run`'s exit code.

use std::time::Duration;

use anyhow::{ensure, Result};
use tests::{md5_hex, yes_pattern, NestedVm};

/// L1 loads the KVM modules, reports nested SVM with nested paging, and a
/// VM made with bare KVM ioctls exits on `out` and on `hlt`.
#[test]
fn l1_has_nested_kvm_that_runs_guest_code() -> Result<()> {
    let data = yes_pattern("passed-in", 3 << 20);
    let out = NestedVm::new()
        .file("data/pattern", data.clone())
        .l1_script(
            r#"
            kvm-smoke
            result blkvm.version "$(blkvm --version)"
            result pattern.md5 "$(image_md5 /data/pattern)"
            "#,
        )
        .run()?;
    eprintln!("L1 boot (QEMU start to KVM loaded): {:?}", out.boot_time);

    let lines: Vec<&str> = out.l1_lines().collect();
    let has = |line: &str| lines.contains(&line);
    ensure!(
        lines
            .iter()
            .any(|l| l.starts_with("BLKVM-L1-MODULES irqbypass kvm ccp kvm_amd ")),
        out.error("L1 did not load irqbypass, kvm, ccp, kvm_amd in that order")
    );
    ensure!(
        !lines.iter().any(|l| l.starts_with("BLKVM-ERROR")),
        out.error("L1's /init reported an error (a module that did not load?)")
    );
    ensure!(
        has("BLKVM-L1-KVM dev=/dev/kvm nested=1 npt=Y"),
        out.error("L1 has no nested KVM with nested paging")
    );
    ensure!(
        lines.iter().any(|l| l.contains("Nested Paging enabled")),
        out.error("L1's kernel did not say \"Nested Paging enabled\"")
    );
    for line in [
        "KVM-SMOKE ok exit=IO port=0x10 value=0x42",
        "KVM-SMOKE ok exit=HLT rip=0x100f",
        "KVM-SMOKE nested=1",
        "KVM-SMOKE npt=Y",
    ] {
        ensure!(has(line), out.error(&format!("no {line:?} from kvm-smoke")));
    }
    if let Some(speed) = lines.iter().find(|l| l.starts_with("KVM-SMOKE loop ")) {
        eprintln!("{speed}");
    }
    ensure!(
        out.result("blkvm.version")?.starts_with("blkvm "),
        out.error("blkvm did not run in L1")
    );
    ensure!(
        out.result("pattern.md5")? == md5_hex(&data)?,
        out.error("the file passed to L1 arrived changed")
    );
    Ok(())
}

/// What L1's `l2_run` gets on stdout is L2's console: those lines come
/// back marked and are parsed apart (L2's `BLKVM-DONE` does not end the
/// run), and `blkvm run`'s exit code is reported without ending the
/// script. A stand-in `blkvm` plays L2 here, since `blkvm run` cannot boot
/// a guest yet; then the real one is given a bad option.
#[test]
fn l2_console_is_marked_and_blkvm_exit_code_reported() -> Result<()> {
    let mut vm = NestedVm::new()
        .l1_script(
            r#"
            mkdir -p /tmp/fake
            printf '%s\n' '#!/bin/sh' 'echo "L2 says $*"' 'echo BLKVM-RESULT from=l2' \
                'echo BLKVM-DONE rc=0' 'echo blkvm stderr >&2' 'printf no-newline' 'exit 3' \
                >/tmp/fake/blkvm
            chmod +x /tmp/fake/blkvm
            if PATH=/tmp/fake:$PATH l2_run a b; then exit 1; fi
            result fake.rc "$(cat /tmp/l2.rc)"
            if l2_run --no-such-option; then exit 1; fi
            result real.rc "$(cat /tmp/l2.rc)"
            result after from=l1
            "#,
        )
        .spawn()?;
    let first = vm.wait_for("L2| ", Duration::from_secs(120))?;
    let out = vm.wait()?;
    out.check_success()?;

    ensure!(
        first == "L2| L2 says run a b",
        out.error(&format!("the first L2 line is {first:?}"))
    );
    ensure!(
        out.boot_time > Duration::ZERO,
        out.error("L1's boot was not timed")
    );

    let l2: Vec<&str> = out.l2_lines().collect();
    ensure!(
        l2.first() == Some(&"L2 says run a b"),
        out.error("L2's first line is not the stand-in's")
    );
    ensure!(
        out.l2_result("from")? == "l2" && out.l2.rc == Some(0),
        out.error("L2's result or rc was not filed under L2")
    );
    ensure!(
        l2.last() == Some(&"no-newline"),
        out.error("L2's last line, without a newline, did not end as L2's")
    );
    ensure!(
        out.l1_lines().any(|l| l == "blkvm stderr"),
        out.error("blkvm's stderr did not reach L1's console unmarked")
    );
    ensure!(
        out.result("fake.rc")? == "3" && out.result("real.rc")? == "2",
        out.error("l2_run reported the wrong exit codes")
    );
    ensure!(
        out.result("after")? == "from=l1",
        out.error("L1's script did not go on after L2's BLKVM-DONE")
    );
    ensure!(
        !out.l1.results.contains_key("from"),
        out.error("L2's result leaked into L1's")
    );
    Ok(())
}

/// Without SVM (a CPU model that lacks it) kvm-amd does not load, and the
/// harness fails, saying so, instead of running the script.
#[test]
fn l1_without_svm_fails_before_the_script() -> Result<()> {
    let err = NestedVm::new()
        .qemu_arg("-cpu")
        .qemu_arg("qemu64,-svm")
        .l1_script("echo SCRIPT-RAN")
        .run()
        .expect_err("L1 without SVM passed");
    let text = format!("{err:#}");

    ensure!(
        text.contains("BLKVM-ERROR no /dev/kvm"),
        "no clear error:\n{text}"
    );
    ensure!(
        !text.contains("\nSCRIPT-RAN"),
        "the script ran without KVM:\n{text}"
    );
    Ok(())
}
