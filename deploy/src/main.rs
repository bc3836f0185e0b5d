//! `kata-like`: the node tool. `install` and `uninstall` put kata-like on a containerd node and
//! take it off again; `check` says whether the node can run kata-like pods and how to fix what
//! stops it; `env` prints the effective configuration.

mod check;
mod containerd_config;
mod error;
mod install;
mod layout;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use error::{Error, Result};
use install::Restart;
use layout::Layout;

const USAGE: &str = "usage: kata-like install   [--from DIR] [COMMON] [--restart-command CMD | --no-restart] [--node-name NODE]
       kata-like uninstall [COMMON] [--restart-command CMD | --no-restart] [--node-name NODE] [--force]
       kata-like check     [COMMON] [--config FILE]
       kata-like env       [COMMON] [--config FILE]
       kata-like --version
COMMON: [--prefix DIR (/opt/kata-like)] [--containerd-config FILE (/etc/containerd/config.toml)]
        [--containerd-bin FILE (/usr/bin/containerd)] [--root DIR (/: where the node's files are)]
--from: the payload (bin/, share/kata-like/), by default the one this kata-like runs from.
--restart-command: how containerd restarts (default: systemctl restart containerd, with systemd).
NODE (or $NODE_NAME): labelled kata-like.io/runtime=installed with kubectl, unlabelled by uninstall.";

#[derive(Debug, Default)]
struct Args {
    command: String,
    prefix: Option<PathBuf>,
    root: Option<PathBuf>,
    containerd_config: Option<PathBuf>,
    containerd_bin: Option<PathBuf>,
    from: Option<PathBuf>,
    restart_command: Option<String>,
    no_restart: bool,
    node_name: Option<String>,
    force: bool,
    config: Option<PathBuf>,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args {
        command: argv
            .next()
            .ok_or_else(|| Error::new(format!("no command given\n{USAGE}")))?,
        ..Args::default()
    };
    while let Some(flag) = argv.next() {
        let mut value = || {
            argv.next()
                .ok_or_else(|| Error::new(format!("{flag} needs a value\n{USAGE}")))
        };
        match flag.as_str() {
            "--prefix" => a.prefix = Some(layout::absolute(Path::new(&value()?))),
            "--root" => a.root = Some(layout::absolute(Path::new(&value()?))),
            "--containerd-config" => a.containerd_config = Some(PathBuf::from(value()?)),
            "--containerd-bin" => a.containerd_bin = Some(PathBuf::from(value()?)),
            "--from" => a.from = Some(layout::absolute(Path::new(&value()?))),
            "--restart-command" => a.restart_command = Some(value()?),
            "--no-restart" => a.no_restart = true,
            "--node-name" => a.node_name = Some(value()?),
            "--force" => a.force = true,
            "--config" => a.config = Some(layout::absolute(Path::new(&value()?))),
            other => return Err(Error::new(format!("unknown option {other:?}\n{USAGE}"))),
        }
    }
    Ok(a)
}

fn layout_of(a: &Args) -> Result<Layout> {
    let prefix = a
        .prefix
        .clone()
        .unwrap_or_else(|| PathBuf::from(layout::DEFAULT_PREFIX));
    let containerd_config = a
        .containerd_config
        .clone()
        .unwrap_or_else(|| PathBuf::from(layout::DEFAULT_CONTAINERD_CONFIG));
    for (name, p) in [
        ("--prefix", &prefix),
        ("--containerd-config", &containerd_config),
    ] {
        if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(Error::new(format!(
                "{name} {} must be an absolute path without `..`",
                p.display()
            )));
        }
    }
    if prefix == Path::new("/") {
        return Err(Error::new("--prefix / would spread kata-like over the root: use a directory of its own such as /opt/kata-like"));
    }
    Ok(Layout {
        root: a.root.clone().unwrap_or_else(|| PathBuf::from("/")),
        prefix,
        containerd_config,
    })
}

fn containerd_bin(a: &Args, layout: &Layout) -> PathBuf {
    a.containerd_bin
        .clone()
        .unwrap_or_else(|| layout.host(Path::new("/usr/bin/containerd")))
}

fn restart_of(a: &Args, layout: &Layout) -> Result<Restart> {
    if a.no_restart {
        return Ok(Restart::Skip);
    }
    if let Some(cmd) = &a.restart_command {
        return Ok(Restart::Command(cmd.clone()));
    }
    if layout.host(Path::new("/run/systemd/system")).is_dir() {
        return Ok(Restart::Command("systemctl restart containerd".into()));
    }
    Err(Error::new(
        "this node has no systemd to restart containerd: pass --restart-command CMD, or \
         --no-restart and restart containerd yourself",
    ))
}

fn install_options(a: &Args) -> Result<install::Options> {
    let layout = layout_of(a)?;
    let from = match &a.from {
        Some(f) => f.clone(),
        // <payload>/bin/kata-like
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
            .ok_or_else(|| Error::new("cannot tell where this kata-like runs from: pass --from"))?,
    };
    Ok(install::Options {
        restart: restart_of(a, &layout)?,
        containerd_bin: containerd_bin(a, &layout),
        from,
        node_name: a
            .node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty())),
        force: a.force,
        layout,
    })
}

fn shim_config(
    a: &Args,
    layout: &Layout,
) -> std::result::Result<(PathBuf, kata_like_shim::config::Config), String> {
    let explicit = a.config.clone().or_else(|| check::shim_config_path(layout));
    let shown = explicit.clone().unwrap_or_else(|| {
        std::env::var_os(kata_like_shim::config::CONFIG_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(kata_like_shim::config::DEFAULT_CONFIG_PATH))
    });
    kata_like_shim::config::Config::load(explicit.as_deref())
        .map(|c| (shown, c))
        .map_err(|e| e.to_string())
}

fn run(a: &Args) -> Result<ExitCode> {
    match a.command.as_str() {
        "install" => install::install(&install_options(a)?).map(|()| ExitCode::SUCCESS),
        "uninstall" => install::uninstall(&install_options(a)?).map(|()| ExitCode::SUCCESS),
        "check" => {
            let layout = layout_of(a)?;
            let bin = containerd_bin(a, &layout);
            let findings = check::run(&check::Inputs {
                layout: &layout,
                config: shim_config(a, &layout),
                containerd_bin: &bin,
            });
            print!("{}", check::render(&findings));
            Ok(if findings.iter().all(|f| f.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        "env" => {
            let layout = layout_of(a)?;
            println!("prefix: {}", layout.prefix.display());
            println!(
                "containerd configuration: {}",
                layout.containerd_config.display()
            );
            println!("containerd drop-in: {}", layout.drop_in().display());
            match shim_config(a, &layout) {
                Ok((path, config)) => {
                    println!("shim configuration: {}", path.display());
                    println!("{config:#?}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(Error::new(e)),
            }
        }
        "--version" | "version" => {
            println!("kata-like {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(Error::new(format!("unknown command {other:?}\n{USAGE}"))),
    }
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)).and_then(|a| run(&a)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kata-like: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn options_are_parsed_and_bad_ones_named() {
        let a = args("install --prefix /opt/k --no-restart --node-name n1").expect("parses");
        assert_eq!(a.command, "install");
        assert_eq!(a.prefix, Some(PathBuf::from("/opt/k")));
        assert!(a.no_restart);
        assert_eq!(a.node_name.as_deref(), Some("n1"));
        let e = args("install --bogus").unwrap_err();
        assert!(e.to_string().contains("--bogus"), "{e}");
        let e = args("install --prefix").unwrap_err();
        assert!(e.to_string().contains("--prefix needs a value"), "{e}");
    }

    #[test]
    fn a_prefix_of_root_or_with_dotdot_is_refused() {
        for bad in ["check --prefix /", "check --containerd-config /etc/../x"] {
            let e = layout_of(&args(bad).expect("parses")).unwrap_err();
            assert!(e.to_string().contains("--"), "{e}");
        }
    }
}
