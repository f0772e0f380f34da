//! Named network profiles: the deny-mode allow lists each agent needs
//! (its model API, the package registries, git hosting), applied with
//! `airlock network proxy NAME --profile PROFILE`.

use airlock_policy::{Action, Mode, Policy, Rule};

pub struct Profile {
    pub name: &'static str,
    pub description: &'static str,
    pub hosts: &'static [&'static str],
}

/// Package registries and git hosting every coding agent needs.
pub const DEV_HOSTS: &[&str] = &[
    "registry.npmjs.org",
    "pypi.org",
    "files.pythonhosted.org",
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    "deb.debian.org",
    "github.com",
    "api.github.com",
    "codeload.github.com",
    "objects.githubusercontent.com",
    "raw.githubusercontent.com",
];

pub const PROFILES: &[Profile] = &[
    Profile {
        name: "dev",
        description: "package registries (npm, PyPI, crates.io, Debian) and GitHub",
        hosts: &[],
    },
    Profile {
        name: "claude",
        description: "dev + the Anthropic API",
        hosts: &["api.anthropic.com"],
    },
    Profile {
        name: "codex",
        description: "dev + the OpenAI API",
        hosts: &["api.openai.com"],
    },
    Profile {
        name: "gemini",
        description: "dev + the Gemini API",
        hosts: &["generativelanguage.googleapis.com"],
    },
    Profile {
        name: "copilot",
        description: "dev + the GitHub Copilot API",
        hosts: &["api.githubcopilot.com", "api.individual.githubcopilot.com"],
    },
    Profile {
        name: "opencode",
        description: "dev + the Anthropic and OpenAI APIs and the models.dev catalogue",
        hosts: &["api.anthropic.com", "api.openai.com", "models.dev"],
    },
];

pub fn find(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

pub fn names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}

impl Profile {
    /// Switch `policy` to deny mode and add this profile's allow rules.
    pub fn apply(&self, policy: &mut Policy) {
        policy.mode = Mode::Deny;
        for h in DEV_HOSTS.iter().chain(self.hosts) {
            // The lists above are checked by the unit test below.
            if let Ok(r) = Rule::host(Action::Allow, h) {
                policy.add(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_parses_and_applies() {
        for p in PROFILES {
            for h in DEV_HOSTS.iter().chain(p.hosts) {
                Rule::host(Action::Allow, h).unwrap();
            }
            let mut pol = Policy::default();
            p.apply(&mut pol);
            assert_eq!(pol.mode, Mode::Deny);
            assert_eq!(pol.rules.len(), DEV_HOSTS.len() + p.hosts.len());
        }
        // Every agent has a profile of its name.
        for a in crate::agents::names() {
            assert!(a == "shell" || find(a).is_some(), "no profile for {a}");
        }
    }
}
