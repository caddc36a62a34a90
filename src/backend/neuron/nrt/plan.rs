//! Matching a loaded NEFF's tensor list against its manifest graph entry: which NEFF name each
//! manifest input/output binds to, and whether its byte size agrees (the dtype code is not
//! trusted; see notes on the SDKs' two numberings). Pure, so it is unit-tested without libnrt.

use std::path::Path;

use super::handles::TensorInfo;
use crate::backend::neuron::manifest::{GraphEntry, Role, TensorSpec};
use crate::error::{Error, Result};

/// The NEFF tensor names a graph's inputs and outputs bind to, in manifest order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

fn describe(spec: &TensorSpec) -> String {
    format!("shape {:?} {:?} = {} bytes", spec.shape, spec.dtype, spec.byte_len())
}

/// Finds each manifest tensor in `infos` by its `neff_name`, else by the compiler's default
/// `input{i}` / `output{j}`, and checks sizes; every NEFF tensor must be one of them.
pub fn bind(graph: &GraphEntry, infos: &[TensorInfo], neff_path: &Path) -> Result<Binding> {
    let bad = |message: String| Error::bad_file(neff_path, message);
    let mut used = vec![false; infos.len()];
    let mut find = |is_input: bool, preferred: &str, default: String, spec: &TensorSpec, what: String| {
        let pos = infos
            .iter()
            .position(|t| t.is_input == is_input && t.name == preferred)
            .or_else(|| infos.iter().position(|t| t.is_input == is_input && t.name == default));
        let Some(pos) = pos else {
            return Err(bad(format!(
                "the NEFF of graph {} has no {what} named {preferred:?} (nor {default:?}); it does not match the \
                 manifest: compile again (`python -m kvgen neuron compile <dir>`)",
                graph.name
            )));
        };
        let info = &infos[pos];
        if info.size != spec.byte_len() {
            return Err(bad(format!(
                "NEFF tensor {:?} ({what} of graph {}) is {} bytes, the manifest says {} ({}); the NEFF was \
                 compiled from a different graph: export and compile again",
                info.name,
                graph.name,
                info.size,
                spec.name,
                describe(spec)
            )));
        }
        used[pos] = true;
        Ok(info.name.clone())
    };
    let mut inputs = Vec::with_capacity(graph.inputs.len());
    for (i, input) in graph.inputs.iter().enumerate() {
        inputs.push(find(true, &input.neff_name, format!("input{i}"), &input.spec, format!("input {i}"))?);
    }
    let mut outputs = Vec::with_capacity(graph.outputs.len());
    for (j, output) in graph.outputs.iter().enumerate() {
        outputs.push(find(false, &output.neff_name, format!("output{j}"), &output.spec, format!("output {j}"))?);
    }
    if let Some(extra) = infos.iter().zip(&used).find(|(_, u)| !**u).map(|(t, _)| t) {
        return Err(bad(format!(
            "the NEFF of graph {} has {} {:?} ({} bytes) that the manifest does not list; compile again",
            graph.name,
            if extra.is_input { "input" } else { "output" },
            extra.name,
            extra.size
        )));
    }
    check_aliases(graph, neff_path)?;
    Ok(Binding { inputs, outputs })
}

/// Every aliased output names a persistent input of the same graph, of the same size.
pub fn check_aliases(graph: &GraphEntry, manifest_path: &Path) -> Result<()> {
    for out in &graph.outputs {
        let Some(target) = &out.aliases else { continue };
        let input = graph.inputs.iter().find(|i| &i.spec.name == target).ok_or_else(|| {
            Error::bad_file(
                manifest_path,
                format!(
                    "output {} of graph {} aliases {target:?}, which is not an input of it",
                    out.spec.name, graph.name
                ),
            )
        })?;
        if input.role == Role::Step || input.spec.byte_len() != out.spec.byte_len() {
            return Err(Error::bad_file(
                manifest_path,
                format!(
                    "output {} of graph {} aliases input {target:?} ({:?}, {} bytes vs {} bytes): only a persistent \
                     tensor of the same size can be updated in place",
                    out.spec.name,
                    graph.name,
                    input.role,
                    input.spec.byte_len(),
                    out.spec.byte_len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::neuron::manifest::{ElemType, GraphInput, GraphOutput, Phase};

    fn spec(name: &str, shape: &[i64], dtype: ElemType) -> TensorSpec {
        TensorSpec { name: name.into(), shape: shape.to_vec(), dtype }
    }

    fn graph() -> GraphEntry {
        GraphEntry {
            name: "tkg_b1_n8".into(),
            phase: Phase::TokenGeneration,
            batch: 1,
            bucket: 8,
            file: "tkg_b1_n8.hlo.pb".into(),
            sha256: String::new(),
            inputs: vec![
                GraphInput { spec: spec("w", &[4, 4], ElemType::Float32), role: Role::Weight, neff_name: "w".into() },
                GraphInput {
                    spec: spec("kc", &[8, 2], ElemType::Bfloat16),
                    role: Role::Cache,
                    neff_name: "kc.must_alias_input".into(),
                },
                GraphInput { spec: spec("ids", &[1], ElemType::Int32), role: Role::Step, neff_name: "ids".into() },
            ],
            outputs: vec![
                GraphOutput {
                    spec: spec("logits", &[1, 4], ElemType::Float32),
                    aliases: None,
                    neff_name: "logits".into(),
                },
                GraphOutput {
                    spec: spec("kc", &[8, 2], ElemType::Bfloat16),
                    aliases: Some("kc".into()),
                    neff_name: "kc".into(),
                },
            ],
            neff: Some("tkg_b1_n8.neff".into()),
        }
    }

    fn info(name: &str, is_input: bool, size: usize) -> TensorInfo {
        TensorInfo { name: name.into(), is_input, size, dtype: 0, shape: vec![] }
    }

    #[test]
    fn binds_by_name_and_falls_back_to_default_names() {
        let infos = vec![
            info("w", true, 64),
            info("kc.must_alias_input", true, 32),
            info("input2", true, 4),
            info("output0", false, 16),
            info("kc", false, 32),
        ];
        let b = bind(&graph(), &infos, Path::new("x.neff")).unwrap();
        assert_eq!(b.inputs, ["w", "kc.must_alias_input", "input2"]);
        assert_eq!(b.outputs, ["output0", "kc"]);
    }

    #[test]
    fn size_mismatch_names_the_tensor() {
        let infos = vec![
            info("w", true, 64),
            info("kc.must_alias_input", true, 32),
            info("ids", true, 8),
            info("logits", false, 16),
            info("kc", false, 32),
        ];
        let e = bind(&graph(), &infos, Path::new("x.neff")).unwrap_err().to_string();
        assert!(e.contains("\"ids\"") && e.contains("8 bytes") && e.contains("4 bytes"), "{e}");
    }

    #[test]
    fn missing_and_extra_tensors_are_errors() {
        let infos = vec![info("w", true, 64), info("ids", true, 4), info("logits", false, 16), info("kc", false, 32)];
        let e = bind(&graph(), &infos, Path::new("x.neff")).unwrap_err().to_string();
        assert!(e.contains("kc.must_alias_input"), "{e}");
        let mut infos = vec![
            info("w", true, 64),
            info("kc.must_alias_input", true, 32),
            info("ids", true, 4),
            info("logits", false, 16),
            info("kc", false, 32),
        ];
        infos.push(info("surprise", true, 4));
        let e = bind(&graph(), &infos, Path::new("x.neff")).unwrap_err().to_string();
        assert!(e.contains("surprise"), "{e}");
    }

    #[test]
    fn alias_must_name_a_persistent_input() {
        let mut g = graph();
        g.outputs[1].aliases = Some("ids".into());
        assert!(check_aliases(&g, Path::new("manifest.json")).is_err());
        g.outputs[1].aliases = Some("nope".into());
        assert!(check_aliases(&g, Path::new("manifest.json")).is_err());
    }
}
