//! The `wgpt` binary started with launcher variables set (no MPI or Slurm needed): `wgpt info`
//! names the launcher, the world and the rank's device; `wgpt train` refuses a world of several
//! ranks with one line; two local ranks on one device are refused before anything is allocated.

use std::process::{Command, Output};

const TINY: &str = "tests/data/tiny";

/// Variables a launcher sets: cleared from the inherited environment, so that the test run itself
/// being inside a Slurm job or an mpirun changes nothing.
fn launcher_var(name: &str) -> bool {
    ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"].contains(&name)
        || ["WGPT_RANK", "WGPT_WORLD_SIZE", "WGPT_LOCAL_", "OMPI_COMM_WORLD_", "PMI_", "MPI_LOCAL", "MV2_COMM_WORLD_", "HOROVOD_", "SLURM_"]
            .iter()
            .any(|p| name.starts_with(p))
}

/// `wgpt args…` with exactly the launcher variables `env`.
fn wgpt(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wgpt"));
    for (k, _) in std::env::vars() {
        if launcher_var(&k) {
            c.env_remove(k);
        }
    }
    c.args(args).envs(env.iter().copied());
    c.output().expect("running wgpt")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `wgpt info` succeeds; its lines from "launcher:" on.
fn info(env: &[(&str, &str)]) -> Vec<String> {
    let o = wgpt(&["info"], env);
    assert!(o.status.success(), "wgpt info failed:\n{}", stderr(&o));
    let out = stdout(&o);
    out.lines().skip_while(|l| !l.starts_with("launcher:")).map(String::from).collect()
}

/// A refusal: non-zero exit, no panic, and stderr is exactly one line, "error: …".
fn one_line_error(o: &Output) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a failure; stdout:\n{}\nstderr:\n{err}", stdout(o));
    assert!(!err.contains("panicked") && !err.contains("internal error"), "panic:\n{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

const OMPI_RANK1_OF4: [(&str, &str); 4] = [
    ("OMPI_COMM_WORLD_RANK", "1"),
    ("OMPI_COMM_WORLD_SIZE", "4"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
    ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
];

#[test]
fn info_in_a_plain_process_is_a_world_of_one() {
    let l = info(&[]);
    assert_eq!(l[0], "launcher: none (one process)");
    assert_eq!(l[1], "world: rank 0 of 1, local rank 0 of 1");
    assert!(!l.iter().any(|x| x.starts_with("rank device")), "{l:?}");
}

#[test]
fn info_names_each_launcher_and_the_rank_device() {
    // (variables, start of the launcher line, start of the world line)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case; 5] = [
        (&OMPI_RANK1_OF4, "launcher: Open MPI mpirun (OMPI_COMM_WORLD_RANK=1", "world: rank 1 of 4, local rank 1 of 4"),
        (
            &[("PMI_RANK", "2"), ("PMI_SIZE", "3"), ("MPI_LOCALRANKID", "0"), ("MPI_LOCALNRANKS", "1")],
            "launcher: MPICH/Intel MPI hydra (PMI) (PMI_RANK=2",
            "world: rank 2 of 3, local rank 0 of 1",
        ),
        (
            &[
                ("SLURM_STEP_ID", "0"),
                ("SLURM_PROCID", "3"),
                ("SLURM_STEP_NUM_TASKS", "4"),
                ("SLURM_LOCALID", "1"),
                ("SLURM_STEP_TASKS_PER_NODE", "2(x2)"),
            ],
            "launcher: Slurm srun/yhrun (SLURM_PROCID=3",
            "world: rank 3 of 4, local rank 1 of 2",
        ),
        (
            &[("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "4"), ("TORCHELASTIC_RUN_ID", "x")],
            "launcher: torchrun (RANK=5",
            "world: rank 5 of 8, local rank 1 of 4",
        ),
        (
            // WGPT_* wins over everything else
            &[("WGPT_RANK", "0"), ("WGPT_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4")],
            "launcher: WGPT_RANK/WGPT_WORLD_SIZE (WGPT_RANK=0 WGPT_WORLD_SIZE=2)",
            "world: rank 0 of 2, local rank 0 of 2 (the launcher gives no local rank/size",
        ),
    ];
    for (env, launcher, world) in cases {
        let l = info(env);
        assert!(l[0].starts_with(launcher), "{env:?}: {l:?}");
        assert!(l[1].starts_with(world), "{env:?}: {l:?}");
        // a world of several says which device this rank would take (or why it cannot)
        assert!(l.iter().any(|x| x.starts_with("rank device (--backend auto): ")), "{env:?}: {l:?}");
    }
}

#[test]
fn info_ignores_an_sbatch_shell_and_reports_bad_values() {
    let l = info(&[("SLURM_JOB_ID", "17"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "0")]);
    assert!(l[0].starts_with("launcher: none (one process); SLURM_PROCID=0 SLURM_NTASKS=4 ignored: no SLURM_STEP_ID"), "{l:?}");
    assert_eq!(l[1], "world: rank 0 of 1, local rank 0 of 1");
    let l = info(&[("OMPI_COMM_WORLD_RANK", "4"), ("OMPI_COMM_WORLD_SIZE", "4")]);
    assert_eq!(l[0], "launcher: error: OMPI_COMM_WORLD_RANK: 4 is not below OMPI_COMM_WORLD_SIZE=4 (Open MPI mpirun)");
}

#[test]
fn a_world_of_several_without_mpi_is_one_line_naming_wgpt_mpi_lib() {
    // a flag error comes before MPI is looked for
    let o = wgpt(&["train", "--backend", "cpu", "--seq-len", "0"], &OMPI_RANK1_OF4);
    assert_eq!(one_line_error(&o), "error: --seq-len: must be at least 1");
    // no MPI library where WGPT_MPI_LIB points: one line naming the variable, before any data is read
    let env = [("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2"), ("WGPT_MPI_LIB", "/no/such/libmpi.so")];
    let o = wgpt(&["train", "--backend", "cpu", "--train", "no/such/shard_*.bin"], &env);
    let e = one_line_error(&o);
    assert!(e.starts_with("error: ") && e.contains("WGPT_MPI_LIB") && e.contains("/no/such/libmpi.so"), "{e}");
    // an inconsistent environment is an error naming the variable, not a world of one
    let o = wgpt(&["train"], &[("RANK", "4"), ("WORLD_SIZE", "4")]);
    assert_eq!(one_line_error(&o), "error: RANK: 4 is not below WORLD_SIZE=4 (torchrun)");
}

#[test]
fn two_local_ranks_on_one_device_are_refused() {
    let two = [("WGPT_RANK", "0"), ("WGPT_WORLD_SIZE", "2"), ("WGPT_LOCAL_RANK", "0"), ("WGPT_LOCAL_SIZE", "2")];
    let verify = |extra: &[&str], env: &[(&str, &str)]| {
        let model = format!("{TINY}/model.bin");
        let state = format!("{TINY}/debug_state.bin");
        let mut args = vec!["verify", "--model", &model, "--state", &state, "--steps", "1"];
        args.extend_from_slice(extra);
        wgpt(&args, env)
    };
    // the cpu backend has no device to share: two local ranks run
    let o = verify(&["--backend", "cpu"], &two);
    assert!(o.status.success(), "{}", stderr(&o));

    // the adapters wgpt spreads ranks over: hardware ones (else all), of the first API present
    let o = wgpt(&["info"], &[]);
    let adapters: Vec<(usize, bool)> = stdout(&o)
        .lines()
        .filter(|l| l.starts_with("  --device "))
        .map(|l| {
            let api = ["Vulkan", "Metal", "Dx12", "Gl"].iter().position(|a| l.contains(&format!("({a}, "))).unwrap_or(4);
            (api, !l.contains(", Cpu, ") && !l.contains(", Other, "))
        })
        .collect();
    if adapters.is_empty() {
        assert!(std::env::var_os("WGPT_REQUIRE_ADAPTER").is_none(), "no wgpu adapter (WGPT_REQUIRE_ADAPTER is set)");
        eprintln!("no wgpu adapter: the wgpu cases are skipped");
        return;
    }
    let any_hw = adapters.iter().any(|a| a.1);
    let candidates: Vec<usize> = adapters.iter().filter(|a| a.1 || !any_hw).map(|a| a.0).collect();
    let best = *candidates.iter().min().unwrap();
    let usable = candidates.iter().filter(|&&a| a == best).count();

    // an explicit list naming one adapter twice
    let o = verify(&["--backend", "wgpu", "--device-per-rank", "0,0"], &two);
    assert_eq!(
        one_line_error(&o),
        "error: --device-per-rank: 0,0: local ranks 0 and 1 would both use wgpu adapter 0: give each local rank its own device"
    );
    // auto: one GPU (or lavapipe alone, though wgpu lists it through Vulkan and GL) for two ranks
    let o = verify(&["--backend", "wgpu"], &two);
    if usable < 2 {
        let e = one_line_error(&o);
        assert!(e.starts_with("error: local ranks 0 and 1 would both use wgpu adapter "), "{e}");
        assert!(e.ends_with("launch one rank per GPU, or set --device-per-rank"), "{e}");
    } else {
        assert!(o.status.success(), "{} usable adapters, yet: {}", usable, stderr(&o));
    }
    // --device wins over the mapping
    let o = verify(&["--backend", "wgpu", "--device", "0"], &two);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn device_per_rank_flag_is_documented_and_checked() {
    let o = wgpt(&["train", "--help"], &[]);
    let help = stdout(&o);
    let at = help.find("--device-per-rank").expect("--device-per-rank in train --help");
    let next_flag = help[at + 2..].find("\n  -").map_or(help.len(), |i| at + 2 + i);
    assert!(help[at..next_flag].contains("[default: auto]"), "{}", &help[at..next_flag]);
    let o = wgpt(&["train", "--device-per-rank", "0,x"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--device-per-rank"), "{}", stderr(&o));
}
