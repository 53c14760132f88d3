//! The crate's one error type. Every fallible public function returns [`Result`]; messages say what is wrong,
//! where, and how to fix it, because in a notebook the message is all the user sees.
use std::fmt;
use std::path::PathBuf;

/// Shorthand for `std::result::Result<T, distill::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in distill.
///
/// `Debug` prints the same readable message as `Display`, so that `Err(..)` at the end of a notebook cell (and
/// `unwrap` failures) read as sentences, not as nested structs.
#[non_exhaustive]
pub enum Error {
    /// A name (architecture, dataset, parameter, module, ...) that matches nothing.
    UnknownName {
        /// What kind of name it is ("architecture", "parameter", ...).
        what: &'static str,
        /// The name as given.
        name: String,
        /// Close matches, best first.
        suggestions: Vec<String>,
        /// Every valid name, when the list is short enough to print.
        valid: Vec<String>,
    },
    /// A value outside its allowed range or otherwise unusable.
    InvalidArgument {
        /// The parameter's name, as the user spelled it.
        name: String,
        /// What is wrong and what would be accepted.
        message: String,
    },
    /// Tensors whose shapes do not fit together.
    Shape(String),
    /// A forward pass failed inside a named module.
    Forward {
        /// Dotted name of the innermost module that failed.
        module: String,
        /// The underlying error.
        source: Box<Error>,
    },
    /// A data file that is missing, truncated or malformed.
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, with a line or byte offset where known.
        message: String,
    },
    /// A checkpoint that cannot be read or does not fit the model.
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An I/O error on a named file or folder.
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Problems in a compression schedule, each as `file:line:column: message`.
    Schedule(Vec<String>),
    /// A table (polars DataFrame) operation or a chart that could not be made.
    Table(String),
    /// An error reported by libtorch.
    Torch(tch::TchError),
    /// A failed rendezvous or collective of distributed training (a peer that died, a timeout, a bad launch).
    Distributed(String),
}

impl Error {
    /// An [`Error::InvalidArgument`] for parameter `name`.
    pub fn invalid(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument { name: name.into(), message: message.into() }
    }

    /// An [`Error::UnknownName`] with did-you-mean suggestions drawn from `valid`.
    pub fn unknown<I, S>(what: &'static str, name: &str, valid: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let valid: Vec<String> = valid.into_iter().map(Into::into).collect();
        let suggestions = did_you_mean(name, &valid);
        Error::UnknownName { what, name: name.to_string(), suggestions, valid }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// An [`Error::Data`] for `path`.
    pub fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data { path: path.into(), message: message.into() }
    }

    /// An [`Error::Checkpoint`] for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.into(), message: message.into() }
    }
}

/// Lists printed in full stay below this many entries; longer ones show suggestions only.
const MAX_LISTED: usize = 40;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownName { what, name, suggestions, valid } => {
                write!(f, "unknown {what} '{name}'")?;
                if !suggestions.is_empty() {
                    write!(f, "; did you mean {}?", quoted_list(suggestions, " or "))?;
                }
                if !valid.is_empty() && valid.len() <= MAX_LISTED {
                    write!(f, " (valid: {})", valid.join(", "))?;
                } else if valid.is_empty() {
                    write!(f, " (nothing of that kind exists here)")?;
                }
                Ok(())
            }
            Error::InvalidArgument { name, message } => write!(f, "invalid {name}: {message}"),
            Error::Shape(message) => write!(f, "shape mismatch: {message}"),
            Error::Forward { module, source } => write!(f, "in module '{module}': {source}"),
            Error::Data { path, message } => write!(f, "{}: {message}", path.display()),
            Error::Checkpoint { path, message } => write!(f, "checkpoint {}: {message}", path.display()),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Schedule(problems) => write!(f, "{}", problems.join("\n")),
            Error::Table(message) => write!(f, "table: {message}"),
            Error::Torch(e) => write!(f, "libtorch: {}", torch_message(&e.to_string())),
            Error::Distributed(message) => write!(f, "distributed: {}", torch_message(message)),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Forward { source, .. } => Some(source.as_ref()),
            Error::Io { source, .. } => Some(source),
            Error::Torch(e) => Some(e),
            _ => None,
        }
    }
}

impl From<polars::prelude::PolarsError> for Error {
    fn from(e: polars::prelude::PolarsError) -> Self {
        Error::Table(e.to_string())
    }
}

/// libtorch's message without the C++ stack trace it appends ("Exception raised from ... frame #0: ..."), joined
/// on one line.
fn torch_message(text: &str) -> String {
    let cut = ["\nException raised from", "Exception raised from", "\nframe #"].iter().filter_map(|m| text.find(m)).min().unwrap_or(text.len());
    text[..cut].split_whitespace().collect::<Vec<_>>().join(" ")
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e)
    }
}

fn quoted_list(items: &[String], last_sep: &str) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{}{last_sep}{last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

/// Up to three candidates close to `name`, closest first: small edit distance, or a shared dotted suffix or
/// prefix (so `conv1.weight` suggests `layer1.0.conv1.weight`).
pub fn did_you_mean(name: &str, candidates: &[String]) -> Vec<String> {
    let lower = name.to_lowercase();
    let budget = (lower.chars().count() / 3).max(2);
    let mut scored: Vec<(usize, &String)> = candidates
        .iter()
        .filter_map(|c| {
            let cl = c.to_lowercase();
            let d = edit_distance(&lower, &cl);
            if d <= budget {
                Some((d, c))
            } else if cl.ends_with(&format!(".{lower}")) || cl.starts_with(&format!("{lower}.")) {
                Some((budget + 1, c))
            } else {
                None
            }
        })
        .collect();
    scored.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().take(3).map(|(_, c)| c.clone()).collect()
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diag + usize::from(ca != cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_messages_lose_their_cpp_trace() {
        let raw = "Torch(\"invalid argument\nException raised from empty_cpu at aten/src/ATen/EmptyTensor.cpp:12 (most recent call first):\nframe #0: c10::Error\")";
        assert_eq!(torch_message(raw), "Torch(\"invalid argument");
        let e = Error::from(tch::Tensor::f_zeros([-1], (tch::Kind::Float, tch::Device::Cpu)).unwrap_err());
        let text = e.to_string();
        assert!(!text.contains('\n') && !text.contains("frame #"), "{text}");
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_substitutions() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("lenet", "lenet"), 0);
    }

    #[test]
    fn suggestions_rank_closest_first_and_match_dotted_suffixes() {
        let valid: Vec<String> =
            ["resnet20_cifar", "resnet32_cifar", "lenet", "layer1.0.conv1.weight"].map(String::from).to_vec();
        assert_eq!(did_you_mean("resnet20_cifr", &valid), vec!["resnet20_cifar", "resnet32_cifar"]);
        assert_eq!(did_you_mean("conv1.weight", &valid), vec!["layer1.0.conv1.weight"]);
        assert!(did_you_mean("zzzzzzzz", &valid).is_empty());
    }

    #[test]
    fn unknown_name_message_lists_suggestions_and_valid_names() {
        let e = Error::unknown("architecture", "lenett", ["lenet", "mlp"]);
        assert_eq!(e.to_string(), "unknown architecture 'lenett'; did you mean 'lenet'? (valid: lenet, mlp)");
    }
}
