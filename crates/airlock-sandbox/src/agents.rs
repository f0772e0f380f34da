//! The agents airlock can start. Each maps the user's arguments (everything
//! after `--`, unchanged) to the command run inside the sandbox.

pub struct Agent {
    pub name: &'static str,
    pub description: &'static str,
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

/// The built-in agents. Agent templates (Claude Code, Codex, ...) add to
/// this list when they land.
pub const AGENTS: &[Agent] = &[Agent {
    name: "shell",
    description: "an interactive login shell (bash); with arguments, runs them as a command",
    command: shell,
}];

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
}
