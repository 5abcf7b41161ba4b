//! ringkv-bench as a library: the load generator behind `ringkv-bench [run]`, exposed so that
//! its parsers, key generators and open-loop schedule are tested directly (`benches/tests/`).
//! The engine benchmark (`ringkv-bench engine`) lives in the binary only.

pub mod load;
