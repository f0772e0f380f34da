//! The agents airlock can start. Each maps the user's arguments (everything
//! after `--`, unchanged) to the command run inside the sandbox, and names
//! the template it runs on. Agent templates (`claude`, ...) are the base
//! template plus the agent's npm package at the version pinned in
//! `crates/airlock-template/agents.lock` (see `airlock_template::agent`).
//!
//! Each agent starts in its fully autonomous mode: the sandbox is the
//! control, not per-command prompts. Processes run as root inside the
//! sandbox's user namespace, which is the invoking user on the host (files
//! written to a workspace belong to that user); `IS_SANDBOX=1` in the guest
//! environment is what lets Claude Code accept
//! `--dangerously-skip-permissions` as root.

pub struct Agent {
    pub name: &'static str,
    pub description: &'static str,
    /// Template a new sandbox of this agent uses (unless `-t` says otherwise).
    pub template: &'static str,
    /// Command line for the given agent arguments.
    pub command: fn(&[String]) -> Vec<String>,
}

fn shell(args: &[String]) -> Vec<String> {
    if args.is_empty() {
        vec!["bash".into(), "-l".into()]
    } else {
        // `airlock run shell WS -- CMD ARG...` runs CMD ARG... as is.
        args.to_vec()
    }
}

fn with(prefix: &[&str], args: &[String]) -> Vec<String> {
    prefix
        .iter()
        .map(|s| s.to_string())
        .chain(args.iter().cloned())
        .collect()
}

fn claude(args: &[String]) -> Vec<String> {
    with(&["claude", "--dangerously-skip-permissions"], args)
}

/// Codex: no approvals, and no Landlock/seccomp sandbox of its own (it
/// would fight ours: nested user namespaces are refused in the sandbox).
fn codex(args: &[String]) -> Vec<String> {
    with(
        &["codex", "--dangerously-bypass-approvals-and-sandbox"],
        args,
    )
}

fn gemini(args: &[String]) -> Vec<String> {
    with(&["gemini", "--yolo"], args)
}

/// `--allow-all` = `--allow-all-tools --allow-all-paths --allow-all-urls`.
fn copilot(args: &[String]) -> Vec<String> {
    with(&["copilot", "--allow-all"], args)
}

/// `--auto`: approve every permission not explicitly denied.
fn opencode(args: &[String]) -> Vec<String> {
    with(&["opencode", "--auto"], args)
}

/// The built-in agents.
pub const AGENTS: &[Agent] = &[
    Agent {
        name: "shell",
        description: "an interactive login shell (bash); with arguments, runs them as a command",
        template: "base",
        command: shell,
    },
    Agent {
        name: "claude",
        description: "Claude Code (claude --dangerously-skip-permissions)",
        template: "claude",
        command: claude,
    },
    Agent {
        name: "codex",
        description: "OpenAI Codex CLI (codex --dangerously-bypass-approvals-and-sandbox)",
        template: "codex",
        command: codex,
    },
    Agent {
        name: "gemini",
        description: "Gemini CLI (gemini --yolo)",
        template: "gemini",
        command: gemini,
    },
    Agent {
        name: "copilot",
        description: "GitHub Copilot CLI (copilot --allow-all)",
        template: "copilot",
        command: copilot,
    },
    Agent {
        name: "opencode",
        description: "OpenCode (opencode --auto)",
        template: "opencode",
        command: opencode,
    },
];

pub fn find(name: &str) -> Option<&'static Agent> {
    AGENTS.iter().find(|a| a.name == name)
}

pub fn names() -> Vec<&'static str> {
    AGENTS.iter().map(|a| a.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_passes_args_unchanged() {
        let a = find("shell").unwrap();
        assert_eq!((a.command)(&[]), vec!["bash", "-l"]);
        let args = vec![
            "echo".to_string(),
            "a b".into(),
            "--".into(),
            "$HOME".into(),
        ];
        assert_eq!((a.command)(&args), args);
        assert!(find("nope").is_none());
    }

    #[test]
    fn agents_start_autonomous_with_args_after() {
        let args = vec!["-p".to_string(), "fix the bug; rm -rf /".into()];
        let c = find("claude").unwrap();
        assert_eq!(c.template, "claude");
        assert_eq!(
            (c.command)(&args),
            vec![
                "claude",
                "--dangerously-skip-permissions",
                "-p",
                "fix the bug; rm -rf /"
            ]
        );
        assert_eq!(
            (find("gemini").unwrap().command)(&[]),
            vec!["gemini", "--yolo"]
        );
    }

    #[test]
    fn every_agent_template_is_pinned() {
        let pins = airlock_template::builtin_pins();
        for a in AGENTS.iter().filter(|a| a.template != "base") {
            assert!(
                pins.iter().any(|p| p.name == a.template),
                "{} has no lock entry",
                a.name
            );
        }
    }
}
