//! kubectl-sidekey: a kubectl plugin (`kubectl sidekey …`) that answers "why was my pod (not)
//! injected?" and "what do my templates render?".
//!
//! `why` reads what the path depends on (`gather`, the only module that talks to the API
//! server), then walks it with pure steps (`diagnose`: the pod's annotations, the webhook's
//! selectors, the injector's reachability and certificate (`tls`), the injector's own decision
//! (its library, with the running injector's `settings`), the status annotation, the policy, the
//! agent containers) and prints the first thing wrong first (`report`). `render` renders the
//! pod's templates with the agent's engines against secret data from a file (`render`).

pub mod authored;
pub mod diagnose;
pub mod gather;
pub mod render;
pub mod report;
pub mod selector;
pub mod settings;
pub mod tls;
