//! Command-line grammar (clap derive). Every command has examples in its
//! help.

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "airlock",
    version,
    about = "Run AI coding agents in disposable sandboxes whose only way out is a policed egress proxy",
    after_help = "Examples:
  airlock run shell ~/proj                 # a shell in a sandbox sharing ~/proj at the same path
  airlock run shell ~/proj ~/docs:ro -- make test
  airlock ls
  airlock exec -it shell-proj bash
  airlock network proxy shell-proj --policy deny --allow-host '*.npmjs.org'
  airlock network log shell-proj
  airlock rm -f shell-proj

Exit codes: 0 ok, 1 error, 2 bad usage; run/exec return the command's status
(125 airlock failed, 126 not executable, 127 not found).
State: $AIRLOCK_HOME, else /var/lib/airlock (root) or ~/.local/share/airlock."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create (if needed), start and attach to a sandbox running an agent
    #[command(after_help = "Examples:
  airlock run shell                        # workspace = current directory, name = shell-<dir>
  airlock run shell ~/proj ~/data:ro       # extra workspaces, :ro = read-only
  airlock run shell ~/proj -- python3 -V   # arguments after -- go to the agent unchanged
  airlock run shell-proj                   # re-enter an existing sandbox by name")]
    Run(RunArgs),
    /// Create a sandbox without starting it
    #[command(after_help = "Examples:
  airlock create shell ~/proj --name web
  airlock start web && airlock exec web ls")]
    Create(RunArgs),
    /// List sandboxes
    #[command(after_help = "Examples:
  airlock ls
  airlock ls --json | jq '.[].name'
  airlock ls -q | xargs airlock stop")]
    Ls {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        /// Names only
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run a command in a running sandbox
    #[command(after_help = "Examples:
  airlock exec shell-proj ls -la
  airlock exec -it shell-proj bash
  airlock exec -e DEBUG=1 -w /tmp shell-proj env")]
    Exec(ExecArgs),
    /// Stop sandboxes (their state is kept)
    #[command(after_help = "Example:\n  airlock stop shell-proj")]
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Start stopped sandboxes
    #[command(after_help = "Example:\n  airlock start shell-proj")]
    Start {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove sandboxes: their root filesystem layer, packages and logs (workspace files are untouched)
    #[command(after_help = "Examples:\n  airlock rm shell-proj\n  airlock rm -f $(airlock ls -q)")]
    Rm {
        /// Stop running sandboxes first
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Show a sandbox's details
    #[command(after_help = "Example:\n  airlock inspect shell-proj --json")]
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Network policy and log
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Root filesystem templates
    #[command(subcommand)]
    Template(TemplateCmd),
    /// API keys kept on the host and injected by the egress engine (values are never printed)
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Check what this host supports
    #[command(after_help = "Example:\n  airlock doctor")]
    Doctor {
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// Commands whose exit status is a sandboxed command's.
    pub fn is_attached(&self) -> bool {
        matches!(self, Command::Run(_) | Command::Exec(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Isolation {
    /// A microVM where hardware virtualization works, else namespaces
    Auto,
    /// A microVM (QEMU microvm; software emulation where KVM does not work)
    Vm,
    /// Linux namespaces + seccomp + Landlock
    Ns,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Agent to run (`shell`), or the name of an existing sandbox to re-enter
    pub agent: String,
    /// Workspace directories shared at the same path (default: the current directory); suffix `:ro` for read-only
    pub workspaces: Vec<String>,
    /// Sandbox name (default: <agent>-<basename of the first workspace>)
    #[arg(long)]
    pub name: Option<String>,
    /// Root filesystem template (default: the agent's own: `claude` for claude, `base` for shell)
    #[arg(short = 't', long)]
    pub template: Option<String>,
    /// Isolation backend
    #[arg(long, value_enum, default_value_t = Isolation::Auto)]
    pub isolation: Isolation,
    /// Allow sharing `/`, your home directory or a directory containing it
    #[arg(long)]
    pub force: bool,
    /// Arguments passed to the agent unchanged (after `--`)
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Keep stdin open and forward it
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE), repeatable
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the sandbox
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// User name or uid inside the sandbox
    #[arg(short, long)]
    pub user: Option<String>,
    /// Sandbox name
    pub name: String,
    /// Command and arguments
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Change a sandbox's network policy (applies at once to a running sandbox)
    #[command(
        after_help = "Rules add to the current policy; --clear starts from an empty one.
Patterns: example.com (exact), *.example.com (subdomains, not the apex), either with :PORT;
localhost:PORT or host.docker.internal:PORT reach a service on the host's loopback.
Precedence: exact host:port, exact host, longest wildcard, CIDR, mode; block beats allow.

Examples:
  airlock network proxy web --allow-host localhost:8080
  airlock network proxy web --policy deny --allow-host api.anthropic.com --allow-host '*.npmjs.org'
  airlock network proxy web --block-cidr 203.0.113.0/24
  airlock network proxy web --clear --policy allow"
    )]
    Proxy(ProxyArgs),
    /// Show egress decisions, grouped by host (or every event with --json)
    #[command(after_help = "Examples:
  airlock network log
  airlock network log web --limit 20
  airlock network log web --json | jq 'select(.action==\"block\")'
  airlock network log web --follow")]
    Log {
        /// Only this sandbox
        name: Option<String>,
        /// Every event as a JSON line
        #[arg(long)]
        json: bool,
        /// At most N rows (hosts, or events with --json)
        #[arg(long)]
        limit: Option<usize>,
        /// Keep printing new events
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Allow,
    Deny,
}

#[derive(Args, Debug)]
pub struct ProxyArgs {
    pub name: String,
    /// Default for traffic no rule matches
    #[arg(long, value_enum)]
    pub policy: Option<ModeArg>,
    #[arg(long, value_name = "PATTERN")]
    pub allow_host: Vec<String>,
    #[arg(long, value_name = "PATTERN")]
    pub block_host: Vec<String>,
    #[arg(long, value_name = "CIDR")]
    pub allow_cidr: Vec<String>,
    #[arg(long, value_name = "CIDR")]
    pub block_cidr: Vec<String>,
    /// Tunnel without TLS inspection (certificate pinning)
    #[arg(long, value_name = "PATTERN")]
    pub bypass_host: Vec<String>,
    #[arg(long, value_name = "CIDR")]
    pub bypass_cidr: Vec<String>,
    /// Apply a named profile: deny mode + the hosts an agent needs (dev, claude, codex, gemini, copilot, opencode)
    #[arg(long, value_name = "PROFILE")]
    pub profile: Option<String>,
    /// Remove a rule given as shown by this command (e.g. "allow-host example.com")
    #[arg(long, value_name = "RULE")]
    pub remove: Vec<String>,
    /// Start from an empty rule list (mode allow unless --policy)
    #[arg(long)]
    pub clear: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// List built templates
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Build a template: `base` from Debian packages (mmdebstrap), an agent template (claude, codex, gemini, copilot, opencode) as a layer over base with the agent at its pinned version, or a custom template (--from T --run CMD) as a layer over T holding what the commands changed
    #[command(after_help = "Examples:
  airlock template build
  airlock template build --force
  airlock template build claude
  airlock template build claude --update
  airlock template build base --mirror http://deb.debian.org/debian
  airlock template build tools --from base --run 'apt-get update && apt-get install -y jq'
  airlock template build claude-py --from claude --run 'pip install --break-system-packages ruff' --run 'echo ok'

Custom templates run each --run with /bin/sh -c, as root, with the host's network, over
the parent's files (/tmp is scratch space); only the changes are stored. The same
parent build and commands again is a no-op (--force rebuilds).")]
    Build {
        #[arg(default_value = "base")]
        name: String,
        /// Rebuild even if it exists (custom templates: even with the same inputs)
        #[arg(long)]
        force: bool,
        /// Custom template: the template to build it over (with --run)
        #[arg(long, value_name = "TEMPLATE", requires = "run")]
        from: Option<String>,
        /// Custom template: a command to run over --from (repeatable; in order)
        #[arg(long = "run", value_name = "CMD", requires = "from")]
        run: Vec<String>,
        /// Agent templates: move the pinned version to the registry's latest
        /// (recorded in TEMPLATES/agents.lock) and rebuild
        #[arg(long)]
        update: bool,
        /// Debian suite
        #[arg(long, default_value = "trixie")]
        suite: String,
        /// Debian mirror (default: the host's apt source)
        #[arg(long)]
        mirror: Option<String>,
        /// Extra packages
        #[arg(long = "package", value_name = "PKG")]
        packages: Vec<String>,
    },
    /// Create a template from a root filesystem tarball (e.g. one mmdebstrap wrote)
    #[command(after_help = "Example:
  mmdebstrap --variant=apt trixie root.tar && airlock template import base root.tar")]
    Import {
        name: String,
        tarball: std::path::PathBuf,
        /// Debian suite the tarball holds (recorded only)
        #[arg(long, default_value = "trixie")]
        suite: String,
    },
    /// Save a stopped sandbox's changes (its writable layer) as a template over the sandbox's template
    #[command(after_help = "Example:
  airlock run shell ~/proj -- bash -c 'apt-get update && apt-get install -y jq'
  airlock stop shell-proj && airlock template save shell-proj mytools
  airlock run shell ~/other -t mytools

Left out: what airlock writes at each start (/etc/hosts, /etc/hostname,
/etc/resolv.conf, the CA bundle and /etc/airlock, apt's partial directories)
and the sandbox's empty workspace mount points. Workspace files are never part
of a sandbox's layer.")]
    Save {
        /// The sandbox
        sandbox: String,
        /// Name of the new template
        name: String,
        /// Save even while the sandbox runs (files being written may be inconsistent)
        #[arg(long)]
        force: bool,
        /// Replace an existing template of that name
        #[arg(long)]
        replace: bool,
    },
    /// Remove a template (sandboxes using it and templates over it must be removed first)
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum SecretCmd {
    /// Store a secret (value read from stdin, never from the command line)
    #[command(
        after_help = "Secret names are the providers' secret names: anthropic, openai, google, github
(or a user-defined provider's). A key in the host environment at `run` time
(ANTHROPIC_API_KEY, OPENAI_API_KEY, GEMINI_API_KEY/GOOGLE_API_KEY, GH_TOKEN/GITHUB_TOKEN)
takes precedence over a stored one.

Examples:
  airlock secret set anthropic            # prompts without echo
  pass show anthropic | airlock secret set anthropic"
    )]
    Set { name: String },
    /// List stored secret names and the providers that use them
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Delete a stored secret
    Rm { name: String },
}
