//! Generates the gRPC code from `proto/` with protox (pure Rust, no protoc to
//! install) and builds the container init (`src/runtime/init.c`) as a static
//! executable that is embedded into the agent.

use std::env;
use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);

    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["runnel/agent/v1/agent.proto"], ["proto"])?;
    std::fs::write(out.join("runnel_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    println!("cargo:rerun-if-changed=src/runtime/init.c");
    let compiler = cc::Build::new().opt_level(2).get_compiler();
    // The init runs in containers, never in this process: no sanitizer
    // (cc adds one under cargo-fuzz, and it cannot link statically).
    let mut command = std::process::Command::new(compiler.path());
    command.envs(compiler.get_envs()).args(
        compiler
            .args()
            .iter()
            .filter(|a| !a.to_string_lossy().starts_with("-fsanitize")),
    );
    let status = command
        .args(["-static", "-Wall", "-o"])
        .arg(out.join("runnel-init"))
        .arg("src/runtime/init.c")
        .status()?;
    if !status.success() {
        return Err("building src/runtime/init.c as a static executable failed \
                    (needs gcc and libc6-dev)"
            .into());
    }
    Ok(())
}
