//! Template commands without a shell. `agent-inject-command-NAME` (and `command` in a Vault Agent
//! template stanza) is written for `/bin/sh -c`, but the agent image has no shell and no other
//! programs. So a command is read here as a POSIX shell would split it (quotes, backslashes,
//! `&&`, `||`, `;`), and the idioms people put there are performed by the agent itself:
//! signals (`kill`, `pkill`, `killall`, `kill $(pidof …)`), `touch`, `chmod`, `sh -c '…'`, and an
//! HTTP call with `curl` or `wget` to the pod itself. Anything else is refused when the command is
//! read: by the injector at admission, by the agent when it reads an HCL config.
//!
//! [`parse`] is pure and shared by the injector and the agent; [`Script::run`] does the I/O:
//! processes are found by name in `/proc` (which shows the app's processes when the pod shares
//! its process namespace), and HTTP goes over a plain TCP connection to the loopback address.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::signal::Signal;

/// What the agent does itself, for error messages.
pub const BUILT_IN: &str = "the agent image has no shell or other programs; the agent itself performs kill, pkill, killall (with $(pidof NAME) or $(pgrep NAME) as kill's PID), touch, chmod, true, sh -c '…' of these, and curl or wget to http://127.0.0.1, joined by &&, || or ;; for more, agent-inject-action-NAME offers signal:SIG:PROCESS, reload:URL and restart:CONTAINER";

/// A command as error messages quote it: its first 60 characters.
pub fn quoted(command: &str) -> String {
    match command.char_indices().nth(60) {
        Some((cut, _)) => format!("\"{}…\"", command[..cut].escape_debug()),
        None => format!("{command:?}"),
    }
}

/// The deepest `sh -c '…'` nesting read.
const MAX_DEPTH: usize = 4;
/// The longest command read, in bytes.
const MAX_LEN: usize = 16 * 1024;
/// The time an HTTP call may take when the command does not say (`curl -m`, `wget -T`).
const HTTP_TIME_LIMIT: Duration = Duration::from_secs(10);

/// Why a command cannot be performed without a shell. One line; the caller adds the
/// annotation or file:line, and [`BUILT_IN`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("the command is empty")]
    Empty,
    #[error("the command is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("{0} is not closed")]
    Unclosed(&'static str),
    #[error("{0} needs a shell")]
    ShellSyntax(String),
    #[error("{} is not a program the agent performs", quoted(.0))]
    UnknownProgram(String),
    #[error("{program}: {problem}")]
    Arguments {
        program: &'static str,
        problem: String,
    },
    #[error("sh -c nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

fn args_error(program: &'static str, problem: impl Into<String>) -> CommandError {
    CommandError::Arguments {
        program,
        problem: problem.into(),
    }
}

/// How a step is joined to the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// First, or after `;` or a newline.
    Always,
    /// After `&&`.
    IfOk,
    /// After `||`.
    IfFailed,
}

/// A command the agent performs: steps joined as a shell joins them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub steps: Vec<(Join, Step)>,
}

/// One thing the agent does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `kill`, `pkill`, `killall`: a signal to processes.
    Signal {
        signal: Signal,
        targets: Vec<Target>,
    },
    /// `touch FILE…`: create each file or update its time.
    Touch(Vec<PathBuf>),
    /// `chmod MODE FILE…` with an octal mode.
    Chmod { mode: u32, files: Vec<PathBuf> },
    /// `curl` or `wget` to the pod itself.
    Http(HttpCall),
    /// `true`, `:` (succeed) and `false` (fail).
    Exit(bool),
    /// `sh -c '…'` of several steps: their result is the last one's.
    Script(Script),
}

/// Whom a signal goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A PID as written.
    Pid(i32),
    /// Every process that matches.
    Named(ProcessName),
}

/// Processes found by name in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessName {
    pub name: String,
    pub how: Match,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// `pidof`, `killall`: the process name (comm) or argv[0]'s file name is the name.
    Exact,
    /// `pgrep`, `pkill`: the process name contains it (`^` and `$` anchor it).
    Contains,
    /// `pgrep -f`, `pkill -f`: the whole command line contains it.
    CommandLine,
}

/// An HTTP request to the pod itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub method: String,
    pub url: LocalUrl,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    /// An answer of 400 or more fails the step (`curl -f`; always for wget).
    pub fail_on_error_status: bool,
    pub time_limit: Duration,
}

/// An `http://` URL whose host is the pod's loopback address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUrl {
    /// As written, for messages.
    pub text: String,
    /// `host:port` for the Host header.
    pub authority: String,
    pub ip: std::net::IpAddr,
    pub port: u16,
    /// The path and query, at least `/`.
    pub target: String,
}

/// Reads a URL that names the pod itself: `http://localhost`, `127.0.0.1` or `[::1]`.
pub fn local_url(text: &str) -> Result<LocalUrl, String> {
    let rest = text.strip_prefix("http://").ok_or_else(|| {
        if text.starts_with("https://") {
            format!("{text:?}: https is not supported; the call stays inside the pod, use http://")
        } else {
            format!("{text:?} is not an http:// URL")
        }
    })?;
    let (authority, target) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.contains('@') {
        return Err(format!(
            "{text:?}: credentials in the URL are not supported"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{text:?}: {p:?} is not a port"))?,
        ),
        _ => (authority, 80),
    };
    let ip = match host {
        "localhost" | "127.0.0.1" => std::net::IpAddr::from([127, 0, 0, 1]),
        "[::1]" => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        _ => {
            return Err(format!(
                "{text:?} is not inside the pod: the host must be localhost, 127.0.0.1 or [::1]"
            ));
        }
    };
    if target.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!(
            "{text:?}: the path holds spaces or control characters"
        ));
    }
    Ok(LocalUrl {
        text: text.to_string(),
        authority: authority.to_string(),
        ip,
        port,
        target,
    })
}

/// Reads a command as `/bin/sh -c` would, into what the agent performs.
pub fn parse(command: &str) -> Result<Script, CommandError> {
    parse_at(command, 0)
}

fn parse_at(command: &str, depth: usize) -> Result<Script, CommandError> {
    if depth > MAX_DEPTH {
        return Err(CommandError::TooDeep);
    }
    if command.len() > MAX_LEN {
        return Err(CommandError::TooLong);
    }
    let mut steps = Vec::new();
    // How the next command is joined to the one before it.
    let mut join = Join::Always;
    let mut words: Vec<Word> = Vec::new();
    for token in lex(command)? {
        match token {
            Token::Word(w) => words.push(w),
            // Blank lines, and a line break after `&&` or `||` (the command goes on).
            Token::Newline if words.is_empty() => {}
            Token::Newline => {
                steps.push((join, simple_command(&words, depth)?));
                words.clear();
                join = Join::Always;
            }
            // A leading or doubled `;`.
            Token::Op(Join::Always) if words.is_empty() && join == Join::Always => {}
            Token::Op(op) if words.is_empty() => {
                return Err(CommandError::ShellSyntax(format!(
                    "{} with no command before it",
                    op_text(op)
                )));
            }
            Token::Op(op) => {
                steps.push((join, simple_command(&words, depth)?));
                words.clear();
                join = op;
            }
        }
    }
    if !words.is_empty() {
        steps.push((join, simple_command(&words, depth)?));
    } else if join != Join::Always {
        return Err(CommandError::ShellSyntax(format!(
            "{} with no command after it",
            op_text(join)
        )));
    }
    if steps.is_empty() {
        return Err(CommandError::Empty);
    }
    Ok(Script { steps })
}

fn op_text(op: Join) -> &'static str {
    match op {
        Join::Always => "\";\"",
        Join::IfOk => "\"&&\"",
        Join::IfFailed => "\"||\"",
    }
}

/// A word as the shell splits it: literal text, and command substitutions kept unexpanded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Word {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// `$(…)` or a backquoted command, as written inside.
    Substitution(String),
}

impl Word {
    fn push_char(&mut self, c: char) {
        match self.pieces.last_mut() {
            Some(Piece::Text(t)) => t.push(c),
            _ => self.pieces.push(Piece::Text(c.to_string())),
        }
    }

    /// The word's text when it holds no substitution.
    fn literal(&self) -> Option<String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Substitution(_) => return None,
            }
        }
        Some(out)
    }

    /// The word as an inner shell reads it: `sh -c "kill -HUP $(pidof app)"` has the outer
    /// shell put the PIDs in the text; keeping the substitution for the inner reading gives the
    /// same PIDs.
    fn as_shell_text(&self) -> String {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.clone(),
                Piece::Substitution(s) => format!("$({s})"),
            })
            .collect()
    }

    /// The inner command when the word is one substitution and nothing else.
    fn substitution(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [Piece::Substitution(s)] => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(Word),
    Op(Join),
    /// Ends a command as `;` does, except after `&&` or `||`.
    Newline,
}

/// Splits a command into words and operators as a POSIX shell does, refusing what only a shell
/// can do: pipes, background jobs, redirections other than to /dev/null, subshells, variable
/// and arithmetic expansion, `*` patterns, tilde expansion.
fn lex(text: &str) -> Result<Vec<Token>, CommandError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut word = Word::default();
    // A word exists once anything was written for it, even an empty quote ('').
    let mut started = false;
    let mut i = 0;
    let shell = |what: &str| Err(CommandError::ShellSyntax(what.to_string()));
    macro_rules! end_word {
        () => {
            if started {
                tokens.push(Token::Word(std::mem::take(&mut word)));
                started = false;
            }
        };
    }
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\r' => {
                end_word!();
                i += 1;
            }
            '\n' => {
                end_word!();
                tokens.push(Token::Newline);
                i += 1;
            }
            '#' if !started => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '\'' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '\'')
                    .ok_or(CommandError::Unclosed("a single quote"))?;
                started = true;
                if end == 0 {
                    word.pieces.push(Piece::Text(String::new()));
                }
                for &c in &chars[i + 1..i + 1 + end] {
                    word.push_char(c);
                }
                i += end + 2;
            }
            '"' => {
                started = true;
                let mut empty = true;
                i += 1;
                loop {
                    let Some(&c) = chars.get(i) else {
                        return Err(CommandError::Unclosed("a double quote"));
                    };
                    match c {
                        '"' => {
                            i += 1;
                            break;
                        }
                        '\\' => match chars.get(i + 1) {
                            Some('\n') => i += 2,
                            Some(&n @ ('$' | '`' | '"' | '\\')) => {
                                word.push_char(n);
                                empty = false;
                                i += 2;
                            }
                            _ => {
                                word.push_char('\\');
                                empty = false;
                                i += 1;
                            }
                        },
                        '$' | '`' => {
                            match dollar(&chars, i)? {
                                Some((piece, next)) => {
                                    word.pieces.push(piece);
                                    i = next;
                                }
                                None => {
                                    word.push_char('$');
                                    i += 1;
                                }
                            }
                            empty = false;
                        }
                        c => {
                            word.push_char(c);
                            empty = false;
                            i += 1;
                        }
                    }
                }
                if empty {
                    word.pieces.push(Piece::Text(String::new()));
                }
            }
            '\\' => match chars.get(i + 1) {
                Some('\n') => i += 2,
                Some(&n) => {
                    word.push_char(n);
                    started = true;
                    i += 2;
                }
                None => {
                    word.push_char('\\');
                    started = true;
                    i += 1;
                }
            },
            '$' | '`' => match dollar(&chars, i)? {
                Some((piece, next)) => {
                    word.pieces.push(piece);
                    started = true;
                    i = next;
                }
                None => {
                    word.push_char('$');
                    started = true;
                    i += 1;
                }
            },
            '&' if chars.get(i + 1) == Some(&'&') => {
                end_word!();
                tokens.push(Token::Op(Join::IfOk));
                i += 2;
            }
            '&' if chars.get(i + 1) == Some(&'>') => {
                end_word!();
                i = redirect(&chars, i + 2, true)?;
            }
            '&' => return shell("\"&\" (a background job)"),
            '|' if chars.get(i + 1) == Some(&'|') => {
                end_word!();
                tokens.push(Token::Op(Join::IfFailed));
                i += 2;
            }
            '|' => return shell("\"|\" (a pipe)"),
            ';' if chars.get(i + 1) == Some(&';') => return shell("\";;\""),
            ';' => {
                end_word!();
                tokens.push(Token::Op(Join::Always));
                i += 1;
            }
            '>' | '<' => {
                // `2>/dev/null`: the digits before it are the file descriptor, not a word.
                let fd = match word.literal() {
                    Some(t)
                        if started && !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        word = Word::default();
                        started = false;
                        true
                    }
                    _ => false,
                };
                if !fd {
                    end_word!();
                }
                if c == '<' {
                    return shell("\"<\" (input redirection)");
                }
                i = redirect(&chars, i + 1, false)?;
            }
            '(' | ')' => return shell(&format!("{c:?} (a subshell or function)")),
            // `?` and `[` stay as written, as a shell leaves a pattern that matches no file: a
            // URL's query and an IPv6 host need them; `*` is almost always meant to match.
            '*' => return shell("an unquoted '*' (a file name pattern)"),
            '~' if !started => return shell("an unquoted \"~\" (a home folder)"),
            c => {
                word.push_char(c);
                started = true;
                i += 1;
            }
        }
    }
    if started {
        tokens.push(Token::Word(word));
    }
    Ok(tokens)
}

/// After `>` (or `&>`): the one kind of redirection taken, output thrown away: `>/dev/null`,
/// `>>/dev/null`, `>&2`, `2>&1`. The agent keeps no output anyway. Returns the index after it.
fn redirect(chars: &[char], mut i: usize, both: bool) -> Result<usize, CommandError> {
    if chars.get(i) == Some(&'>') || chars.get(i) == Some(&'|') {
        i += 1;
    }
    if !both && chars.get(i) == Some(&'&') {
        let start = i + 1;
        let mut end = start;
        while chars
            .get(end)
            .is_some_and(|c| c.is_ascii_digit() || *c == '-')
        {
            end += 1;
        }
        if end > start {
            return Ok(end);
        }
    }
    while chars.get(i).is_some_and(|c| *c == ' ' || *c == '\t') {
        i += 1;
    }
    let start = i;
    while chars
        .get(i)
        .is_some_and(|c| !c.is_whitespace() && !";&|".contains(*c))
    {
        i += 1;
    }
    let target: String = chars[start..i].iter().collect();
    let target = target.trim_matches(|c| c == '"' || c == '\'');
    if target == "/dev/null" {
        Ok(i)
    } else {
        Err(CommandError::ShellSyntax(format!(
            "redirection to {target:?} (only output to /dev/null is taken)"
        )))
    }
}

/// At `$` or a backquote: a command substitution (returned with the index after it), a lone
/// `$` (`None`), or an expansion only a shell can do.
fn dollar(chars: &[char], i: usize) -> Result<Option<(Piece, usize)>, CommandError> {
    if chars[i] == '`' {
        let end = chars[i + 1..]
            .iter()
            .position(|&c| c == '`')
            .ok_or(CommandError::Unclosed("a backquote"))?;
        let inner: String = chars[i + 1..i + 1 + end].iter().collect();
        return Ok(Some((Piece::Substitution(inner), i + end + 2)));
    }
    match chars.get(i + 1) {
        Some('(') if chars.get(i + 2) == Some(&'(') => Err(CommandError::ShellSyntax(
            "\"$((\" (arithmetic expansion)".into(),
        )),
        Some('(') => {
            let mut depth = 0usize;
            let mut quote: Option<char> = None;
            for (j, &c) in chars.iter().enumerate().skip(i + 1) {
                match (quote, c) {
                    (Some(q), c) if c == q => quote = None,
                    (Some(_), _) => {}
                    (None, '\'' | '"') => quote = Some(c),
                    (None, '(') => depth += 1,
                    (None, ')') => {
                        depth -= 1;
                        if depth == 0 {
                            let inner: String = chars[i + 2..j].iter().collect();
                            return Ok(Some((Piece::Substitution(inner), j + 1)));
                        }
                    }
                    _ => {}
                }
            }
            Err(CommandError::Unclosed("\"$(\""))
        }
        Some(c) if c.is_ascii_alphanumeric() || "_{@*#?$!-".contains(*c) => {
            let name: String = chars[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || "$_{}@*#?!-".contains(**c))
                .take(24)
                .collect();
            Err(CommandError::ShellSyntax(format!(
                "{name:?} (a variable expansion)"
            )))
        }
        _ => Ok(None),
    }
}

/// The program's name as a shell finds it: `/usr/bin/kill` is `kill`.
fn program_name(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

/// Every word of a command as literal text; a substitution anywhere is refused.
fn literals(program: &'static str, words: &[Word]) -> Result<Vec<String>, CommandError> {
    words
        .iter()
        .map(|w| {
            w.literal().ok_or_else(|| {
                args_error(
                    program,
                    "a command substitution is only taken as kill's PID: kill $(pidof NAME)",
                )
            })
        })
        .collect()
}

/// One simple command (its words) into what the agent does for it.
fn simple_command(words: &[Word], depth: usize) -> Result<Step, CommandError> {
    let first = words[0]
        .literal()
        .ok_or_else(|| CommandError::ShellSyntax("a command substitution as the program".into()))?;
    let assigned = first.split_once('=').is_some_and(|(n, _)| {
        !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if assigned {
        return Err(CommandError::ShellSyntax(format!(
            "{first:?} (a variable assignment)"
        )));
    }
    let args = &words[1..];
    Ok(match program_name(&first) {
        "kill" => kill(args)?,
        "pkill" => pkill(&literals("pkill", args)?)?,
        "killall" => killall(&literals("killall", args)?)?,
        "touch" => Step::Touch(files("touch", &literals("touch", args)?)?),
        "chmod" => chmod(&literals("chmod", args)?)?,
        "true" | ":" => Step::Exit(true),
        "false" => Step::Exit(false),
        "curl" => Step::Http(curl(&literals("curl", args)?)?),
        "wget" => Step::Http(wget(&literals("wget", args)?)?),
        // `busybox kill …`: the applet is the program.
        "busybox" if !args.is_empty() => simple_command(args, depth)?,
        "sh" | "bash" | "ash" | "dash" => {
            let args: Vec<String> = args.iter().map(Word::as_shell_text).collect();
            let mut inner = parse_at(&shell_c(&args)?, depth + 1)?;
            match inner.steps.len() {
                1 => inner.steps.remove(0).1,
                _ => Step::Script(inner),
            }
        }
        _ => return Err(CommandError::UnknownProgram(first)),
    })
}

/// `sh [-e] [-x] [-u] -c 'SCRIPT'`: the script.
fn shell_c(args: &[String]) -> Result<String, CommandError> {
    let mut c = false;
    let mut rest = args.iter();
    for a in rest.by_ref() {
        match a.strip_prefix('-') {
            Some(flags) if !flags.is_empty() && flags.chars().all(|f| "ceuxo".contains(f)) => {
                if flags.contains('o') {
                    return Err(args_error("sh", format!("option {a} is not taken")));
                }
                c |= flags.contains('c');
                if c {
                    break;
                }
            }
            _ => return Err(args_error("sh", "only sh -c 'COMMAND' is taken")),
        }
    }
    if !c {
        return Err(args_error("sh", "only sh -c 'COMMAND' is taken"));
    }
    let script = rest
        .next()
        .ok_or_else(|| args_error("sh", "-c needs a command"))?;
    if rest.next().is_some() {
        return Err(args_error(
            "sh",
            "arguments after the command ($0, $1…) are not taken",
        ));
    }
    Ok(script.clone())
}

/// A signal option (`-HUP`, `-SIGHUP`, `-1`), if `arg` is one.
fn signal_option(arg: &str) -> Option<Signal> {
    Signal::parse(arg.strip_prefix('-')?)
}

fn kill(args: &[Word]) -> Result<Step, CommandError> {
    let mut signal = Signal::TERM;
    let mut i = 0;
    let text = |w: &Word| w.literal();
    while let Some(a) = args.get(i).and_then(text) {
        if a == "--" {
            i += 1;
            break;
        }
        if a == "-s" || a == "-n" || a == "--signal" {
            let name = args
                .get(i + 1)
                .and_then(text)
                .ok_or_else(|| args_error("kill", format!("{a} needs a signal")))?;
            signal = Signal::parse(&name)
                .ok_or_else(|| args_error("kill", format!("{name:?} is not a signal")))?;
            i += 2;
            continue;
        }
        if a == "-l" || a == "-L" {
            return Err(args_error("kill", "-l lists signals; nothing to do"));
        }
        if !a.starts_with('-') {
            break;
        }
        signal = signal_option(&a)
            .ok_or_else(|| args_error("kill", format!("{a:?} is not a signal")))?;
        i += 1;
    }
    let mut targets = Vec::new();
    for w in &args[i..] {
        if let Some(inner) = w.substitution() {
            targets.push(Target::Named(lookup(inner)?));
            continue;
        }
        let a = w.literal().ok_or_else(|| {
            args_error(
                "kill",
                "a PID is a number or $(pidof NAME), not a mix of both",
            )
        })?;
        // `kill -HUP $(pidof a b)` splits into several words; a literal PID list also may.
        let pid: i32 = a
            .parse()
            .map_err(|_| args_error("kill", format!("{a:?} is not a PID")))?;
        if pid <= 0 {
            return Err(args_error(
                "kill",
                format!("{pid} names a process group; give a PID or $(pidof NAME)"),
            ));
        }
        targets.push(Target::Pid(pid));
    }
    if targets.is_empty() {
        return Err(args_error("kill", "needs a PID or $(pidof NAME)"));
    }
    Ok(Step::Signal { signal, targets })
}

/// The command inside `$(…)`: `pidof [-s] [-x] NAME` or `pgrep [-f] [-x] PATTERN`.
fn lookup(inner: &str) -> Result<ProcessName, CommandError> {
    let tokens = lex(inner)?;
    let mut words = Vec::new();
    for t in tokens {
        match t {
            Token::Word(w) => words.push(w.literal().ok_or_else(|| {
                CommandError::ShellSyntax("a command substitution inside another".into())
            })?),
            Token::Op(Join::Always) | Token::Newline if words.is_empty() => {}
            Token::Op(_) | Token::Newline => {
                return Err(args_error(
                    "kill",
                    "$(…) holds one pidof or pgrep, nothing joined to it",
                ));
            }
        }
    }
    let Some((program, args)) = words.split_first() else {
        return Err(args_error("kill", "$() is empty"));
    };
    match program_name(program) {
        "pidof" => {
            let names: Vec<&String> = args
                .iter()
                .filter(|a| !matches!(a.as_str(), "-s" | "-x"))
                .collect();
            match names.as_slice() {
                [name] if !name.starts_with('-') => Ok(ProcessName {
                    name: name.to_string(),
                    how: Match::Exact,
                }),
                _ => Err(args_error("pidof", "takes one process name (and -s, -x)")),
            }
        }
        "pgrep" => pattern("pgrep", args),
        other => Err(args_error(
            "kill",
            format!("$({other} …) is not taken; $(pidof NAME) or $(pgrep NAME) is"),
        )),
    }
}

/// `pgrep`/`pkill`'s options and pattern (the signal is read by the caller).
fn pattern(program: &'static str, args: &[String]) -> Result<ProcessName, CommandError> {
    let mut full = false;
    let mut exact = false;
    let mut name = None;
    for a in args {
        match a.as_str() {
            "-f" | "--full" => full = true,
            "-x" | "--exact" => exact = true,
            a if a.starts_with('-') => {
                return Err(args_error(program, format!("option {a} is not taken")));
            }
            a if name.is_none() => name = Some(a.to_string()),
            _ => return Err(args_error(program, "takes one pattern")),
        }
    }
    let mut name = name.ok_or_else(|| args_error(program, "needs a pattern"))?;
    // A plain name, or one anchored with ^ and $; other regular expressions are refused.
    let anchored = (name.starts_with('^'), name.ends_with('$') && name.len() > 1);
    let core = name
        .trim_start_matches('^')
        .trim_end_matches('$')
        .to_string();
    if core.is_empty()
        || core.contains([
            '*', '+', '?', '(', ')', '[', ']', '{', '}', '|', '\\', '^', '$',
        ])
    {
        return Err(args_error(
            program,
            format!(
                "{name:?}: only a plain name (optionally ^anchored$) is taken, not a regular expression"
            ),
        ));
    }
    let how = if full {
        Match::CommandLine
    } else if exact || anchored == (true, true) {
        Match::Exact
    } else {
        Match::Contains
    };
    if anchored != (false, false) && how != Match::Exact {
        return Err(args_error(
            program,
            format!("{name:?}: an anchor is taken only as ^NAME$ (an exact name)"),
        ));
    }
    if how == Match::Exact {
        name = core;
    }
    Ok(ProcessName { name, how })
}

/// Splits `-SIG`, `--signal SIG` and `-s SIG` from the other arguments.
fn split_signal(
    program: &'static str,
    args: &[String],
    short_s: bool,
) -> Result<(Signal, Vec<String>), CommandError> {
    let mut signal = Signal::TERM;
    let mut rest = Vec::new();
    let mut i = 0;
    while let Some(a) = args.get(i) {
        if a == "--signal" || (short_s && a == "-s") {
            let name = args
                .get(i + 1)
                .ok_or_else(|| args_error(program, format!("{a} needs a signal")))?;
            signal = Signal::parse(name)
                .ok_or_else(|| args_error(program, format!("{name:?} is not a signal")))?;
            i += 2;
            continue;
        }
        match signal_option(a) {
            Some(s) if !matches!(a.as_str(), "-f" | "-x" | "-e" | "-q") => signal = s,
            _ => rest.push(a.clone()),
        }
        i += 1;
    }
    Ok((signal, rest))
}

fn pkill(args: &[String]) -> Result<Step, CommandError> {
    let (signal, rest) = split_signal("pkill", args, false)?;
    Ok(Step::Signal {
        signal,
        targets: vec![Target::Named(pattern("pkill", &rest)?)],
    })
}

fn killall(args: &[String]) -> Result<Step, CommandError> {
    let (signal, rest) = split_signal("killall", args, true)?;
    let mut targets = Vec::new();
    for a in rest {
        match a.as_str() {
            // Quiet and exact are how the agent behaves anyway.
            "-q" | "--quiet" | "-e" | "--exact" => {}
            a if a.starts_with('-') => {
                return Err(args_error("killall", format!("option {a} is not taken")));
            }
            name => targets.push(Target::Named(ProcessName {
                name: name.to_string(),
                how: Match::Exact,
            })),
        }
    }
    if targets.is_empty() {
        return Err(args_error("killall", "needs a process name"));
    }
    Ok(Step::Signal { signal, targets })
}

fn files(program: &'static str, args: &[String]) -> Result<Vec<PathBuf>, CommandError> {
    if args.is_empty() {
        return Err(args_error(program, "needs a file"));
    }
    args.iter()
        .map(|a| {
            if a.starts_with('-') {
                Err(args_error(program, format!("option {a} is not taken")))
            } else {
                Ok(PathBuf::from(a))
            }
        })
        .collect()
}

fn chmod(args: &[String]) -> Result<Step, CommandError> {
    let (mode, rest) = args
        .split_first()
        .ok_or_else(|| args_error("chmod", "needs a mode and a file"))?;
    let mode = crate::config::parse_mode(mode).ok_or_else(|| {
        args_error(
            "chmod",
            format!("{mode:?}: only an octal mode is taken (or set agent-inject-perms-NAME)"),
        )
    })?;
    Ok(Step::Chmod {
        mode,
        files: files("chmod", rest)?,
    })
}

/// A time limit in seconds as curl and wget write it ("5", "2.5").
fn seconds(program: &'static str, text: &str) -> Result<Duration, CommandError> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 300.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| args_error(program, format!("{text:?} is not a time limit in seconds")))
}

fn header(program: &'static str, text: &str) -> Result<(String, String), CommandError> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| args_error(program, format!("{text:?} is not a header (Name: value)")))?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        || value.chars().any(|c| c.is_control())
    {
        return Err(args_error(program, format!("{text:?} is not a header")));
    }
    Ok((name.to_string(), value.trim().to_string()))
}

fn curl(args: &[String]) -> Result<HttpCall, CommandError> {
    const P: &str = "curl";
    let mut method = None;
    let mut body: Option<String> = None;
    let mut headers = Vec::new();
    let mut fail = false;
    let mut limit = HTTP_TIME_LIMIT;
    let mut url = None;
    let mut i = 0;
    let value = |i: usize, opt: &str| {
        args.get(i + 1)
            .cloned()
            .ok_or_else(|| args_error(P, format!("{opt} needs a value")))
    };
    while let Some(a) = args.get(i) {
        let mut step = 1;
        match a.as_str() {
            "-X" | "--request" => {
                method = Some(value(i, a)?);
                step = 2;
            }
            "-d" | "--data" | "--data-raw" | "--data-binary" | "--data-ascii" => {
                let d = value(i, a)?;
                if d.starts_with('@') && a != "--data-raw" {
                    return Err(args_error(P, "data from a file (@FILE) is not taken"));
                }
                body = Some(match body {
                    Some(b) => format!("{b}&{d}"),
                    None => d,
                });
                step = 2;
            }
            "-H" | "--header" => {
                headers.push(header(P, &value(i, a)?)?);
                step = 2;
            }
            "-m" | "--max-time" => {
                limit = seconds(P, &value(i, a)?)?;
                step = 2;
            }
            "--connect-timeout" | "--retry" | "--retry-delay" | "--retry-max-time" => step = 2,
            "-o" | "--output" => {
                let target = value(i, a)?;
                if target != "/dev/null" && target != "-" {
                    return Err(args_error(
                        P,
                        "output to a file is not taken (only -o /dev/null)",
                    ));
                }
                step = 2;
            }
            "--fail" | "--fail-with-body" => fail = true,
            "--silent" | "--show-error" | "--location" | "--no-progress-meter" | "--insecure" => {}
            a if a.starts_with("-X") && a.len() > 2 => method = Some(a[2..].to_string()),
            a if a.starts_with("--") => {
                return Err(args_error(P, format!("option {a} is not taken")));
            }
            a if a.starts_with('-') && a.len() > 1 => {
                // Bundled short flags: -fsS, -sSL, -sk.
                for f in a[1..].chars() {
                    match f {
                        'f' => fail = true,
                        's' | 'S' | 'L' | 'k' | 'v' | 'q' => {}
                        f => {
                            return Err(args_error(P, format!("option -{f} is not taken")));
                        }
                    }
                }
            }
            a if url.is_none() => url = Some(a.to_string()),
            _ => return Err(args_error(P, "takes one URL")),
        }
        i += step;
    }
    let url = url.ok_or_else(|| args_error(P, "needs a URL"))?;
    let url = local_url(&url).map_err(|e| args_error(P, e))?;
    let method = method.unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.into());
    Ok(HttpCall {
        method: checked_method(P, method)?,
        url,
        headers,
        body,
        fail_on_error_status: fail,
        time_limit: limit,
    })
}

fn checked_method(program: &'static str, method: String) -> Result<String, CommandError> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(args_error(
            program,
            format!("{method:?} is not an HTTP method"),
        ));
    }
    Ok(method)
}

fn wget(args: &[String]) -> Result<HttpCall, CommandError> {
    const P: &str = "wget";
    let mut method = None;
    let mut body = None;
    let mut headers = Vec::new();
    let mut limit = HTTP_TIME_LIMIT;
    let mut url = None;
    let mut i = 0;
    let value = |i: usize, opt: &str| {
        args.get(i + 1)
            .cloned()
            .ok_or_else(|| args_error(P, format!("{opt} needs a value")))
    };
    while let Some(a) = args.get(i) {
        let mut step = 1;
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut take = |i: usize| -> Result<String, CommandError> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => {
                    step = 2;
                    value(i, name)
                }
            }
        };
        match name {
            "-q" | "--quiet" | "-nv" | "--no-verbose" | "--spider" | "--no-check-certificate" => {}
            "-O-" | "-qO-" | "-qO" | "-O" | "--output-document" => {
                let target = if name.ends_with('-') {
                    "-".into()
                } else {
                    take(i)?
                };
                if target != "-" && target != "/dev/null" {
                    return Err(args_error(
                        P,
                        "output to a file is not taken (only -O- or -O /dev/null)",
                    ));
                }
            }
            "--post-data" => {
                body = Some(take(i)?);
                method.get_or_insert_with(|| "POST".to_string());
            }
            "--method" => method = Some(take(i)?),
            "--body-data" => body = Some(take(i)?),
            "--header" => headers.push(header(P, &take(i)?)?),
            "-T" | "--timeout" => limit = seconds(P, &take(i)?)?,
            "-t" | "--tries" => drop(take(i)?),
            a if a.starts_with('-') => {
                return Err(args_error(P, format!("option {a} is not taken")));
            }
            a if url.is_none() => url = Some(a.to_string()),
            _ => return Err(args_error(P, "takes one URL")),
        }
        i += step;
    }
    let url = url.ok_or_else(|| args_error(P, "needs a URL"))?;
    let url = local_url(&url).map_err(|e| args_error(P, e))?;
    Ok(HttpCall {
        method: checked_method(P, method.unwrap_or_else(|| "GET".into()))?,
        url,
        headers,
        body,
        fail_on_error_status: true,
        time_limit: limit,
    })
}

/// Why a step failed when it ran.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Signal(#[from] crate::signal::SignalError),
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error(transparent)]
    Http(#[from] crate::http_call::HttpError),
    #[error("false")]
    False,
}

impl Script {
    /// Performs the steps as a shell joins them; relative files are taken in `dir` (the
    /// secrets folder, where vault-k8s runs commands). The result is the last step run's.
    pub async fn run(&self, dir: &Path) -> Result<(), StepError> {
        let mut last: Result<(), StepError> = Ok(());
        for (join, step) in &self.steps {
            let go = match join {
                Join::Always => true,
                Join::IfOk => last.is_ok(),
                Join::IfFailed => last.is_err(),
            };
            if go {
                last = step.run(dir).await;
            }
        }
        last
    }
}

impl Step {
    pub async fn run(&self, dir: &Path) -> Result<(), StepError> {
        match self {
            Step::Signal { signal, targets } => {
                crate::signal::deliver(*signal, targets, Path::new(crate::signal::PROC))?;
                Ok(())
            }
            Step::Touch(files) => {
                for f in files {
                    touch(&dir.join(f))?;
                }
                Ok(())
            }
            Step::Chmod { mode, files } => {
                use std::os::unix::fs::PermissionsExt;
                for f in files {
                    let path = dir.join(f);
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                        .map_err(|e| file_error(&path, e))?;
                }
                Ok(())
            }
            Step::Http(call) => {
                crate::http_call::call(call).await?;
                Ok(())
            }
            Step::Exit(true) => Ok(()),
            Step::Exit(false) => Err(StepError::False),
            Step::Script(inner) => Box::pin(inner.run(dir)).await,
        }
    }
}

fn file_error(path: &Path, e: std::io::Error) -> StepError {
    StepError::File {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Creates the file if it is missing and sets its times to now, as `touch` does.
fn touch(path: &Path) -> Result<(), StepError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| file_error(path, e))?;
    let now = std::time::SystemTime::now();
    file.set_times(
        std::fs::FileTimes::new()
            .set_accessed(now)
            .set_modified(now),
    )
    .map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests;
