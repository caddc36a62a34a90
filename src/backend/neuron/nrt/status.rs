//! `NRT_STATUS` codes (kvgen's own table, from the runtime's documented values) and what each
//! becomes as a kvgen error: memory → OutOfMemory with the fix, NaN → Numerical, a missing or
//! mismatched runtime → BackendUnavailable, anything else → Backend naming the code.

use crate::error::{Error, Result};

use super::ffi::NrtStatus;

pub const SUCCESS: NrtStatus = 0;
pub const INVALID: NrtStatus = 2;
pub const RESOURCE: NrtStatus = 4;
pub const TIMEOUT: NrtStatus = 5;
pub const LOAD_NOT_ENOUGH_NC: NrtStatus = 9;
pub const UNSUPPORTED_NEFF_VERSION: NrtStatus = 10;
pub const FAIL_HOST_MEM_ALLOC: NrtStatus = 11;
pub const EXEC_COMPLETED_WITH_NUM_ERR: NrtStatus = 1003;

const NAMES: &[(NrtStatus, &str)] = &[
    (0, "NRT_SUCCESS"),
    (1, "NRT_FAILURE"),
    (2, "NRT_INVALID"),
    (3, "NRT_INVALID_HANDLE"),
    (4, "NRT_RESOURCE"),
    (5, "NRT_TIMEOUT"),
    (6, "NRT_HW_ERROR"),
    (7, "NRT_QUEUE_FULL"),
    (9, "NRT_LOAD_NOT_ENOUGH_NC"),
    (10, "NRT_UNSUPPORTED_NEFF_VERSION"),
    (11, "NRT_FAIL_HOST_MEM_ALLOC"),
    (13, "NRT_UNINITIALIZED"),
    (14, "NRT_CLOSED"),
    (15, "NRT_QUEUE_EMPTY"),
    (101, "NRT_EXEC_UNIT_UNRECOVERABLE"),
    (1002, "NRT_EXEC_BAD_INPUT"),
    (1003, "NRT_EXEC_COMPLETED_WITH_NUM_ERR"),
    (1004, "NRT_EXEC_COMPLETED_WITH_ERR"),
    (1005, "NRT_EXEC_NC_BUSY"),
    (1006, "NRT_EXEC_OOB"),
    (1100, "NRT_COLL_PENDING"),
    (1200, "NRT_EXEC_HW_ERR_COLLECTIVES"),
    (1201, "NRT_EXEC_HW_ERR_HBM_UE"),
    (1202, "NRT_EXEC_HW_ERR_NC_UE"),
    (1203, "NRT_EXEC_HW_ERR_DMA_ABORT"),
    (1204, "NRT_EXEC_SW_NQ_OVERFLOW"),
    (1205, "NRT_EXEC_HW_ERR_REPAIRABLE_HBM_UE"),
    (1206, "NRT_NETWORK_PROXY_FAILURE"),
];

/// `NRT_…` name of a code, or "NRT status N" for one this table does not know.
pub fn name(code: NrtStatus) -> String {
    NAMES.iter().find(|(c, _)| *c == code).map(|(_, n)| n.to_string()).unwrap_or_else(|| format!("NRT status {code}"))
}

/// Where a status came from: the call, the rank, and what it was about (a tensor and its size,
/// a graph) — the parts of the message the user needs to find the cause.
pub struct Site<'a> {
    pub call: &'a str,
    pub rank: usize,
    pub what: &'a str,
}

/// `Ok` for NRT_SUCCESS, else the kvgen error for `code`.
pub fn check(code: NrtStatus, site: &Site<'_>) -> Result<()> {
    if code == SUCCESS {
        Ok(())
    } else {
        Err(error(code, site))
    }
}

pub fn error(code: NrtStatus, site: &Site<'_>) -> Error {
    let Site { call, rank, what } = *site;
    let label = match NAMES.iter().find(|(c, _)| *c == code) {
        Some((_, n)) => format!("{n} ({code})"),
        None => format!("NRT status {code}"),
    };
    let failed = format!("{call} ({what}) returned {label}");
    match code {
        RESOURCE => Error::OutOfMemory(format!(
            "out of device memory on rank {rank}: {failed}; fix: export fewer buckets or batch sizes, a shorter \
             max_context, or a higher tp_degree"
        )),
        FAIL_HOST_MEM_ALLOC => Error::OutOfMemory(format!(
            "out of host memory in the Neuron runtime on rank {rank}: {failed}; fix: free host memory, or export \
             fewer buckets or batch sizes, a shorter max_context, or a higher tp_degree"
        )),
        TIMEOUT => Error::Backend(format!(
            "rank {rank} did not answer within the Neuron runtime's timeout (NEURON_RT_EXEC_TIMEOUT, default 30 s): \
             {failed}; a peer rank is stuck or the ranks ran different collective sequences"
        )),
        EXEC_COMPLETED_WITH_NUM_ERR => Error::Numerical(format!(
            "rank {rank} produced NaN or Inf on the NeuronCore: {failed}; the rows of this step are lost"
        )),
        LOAD_NOT_ENOUGH_NC => Error::BackendUnavailable(format!(
            "not enough free NeuronCores for rank {rank}: {failed}; another process may hold them (check \
             NEURON_RT_VISIBLE_CORES and `neuron-ls`)"
        )),
        UNSUPPORTED_NEFF_VERSION => Error::BackendUnavailable(format!(
            "rank {rank}: {failed}: the NEFF was compiled by a neuronx-cc that does not match this Neuron runtime; \
             compile again with the installed SDK"
        )),
        _ => Error::Backend(format!("rank {rank}: {failed}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: NrtStatus) -> Error {
        error(code, &Site { call: "nrt_tensor_allocate", rank: 1, what: "tensor 'l0.k_cache', 4096 bytes" })
    }

    #[test]
    fn names_known_and_unknown_codes() {
        assert_eq!(name(4), "NRT_RESOURCE");
        assert_eq!(name(1003), "NRT_EXEC_COMPLETED_WITH_NUM_ERR");
        assert_eq!(name(101), "NRT_EXEC_UNIT_UNRECOVERABLE");
        assert_eq!(name(4242), "NRT status 4242");
        assert!(NAMES.windows(2).all(|w| w[0].0 < w[1].0), "codes are unique and sorted");
    }

    #[test]
    fn success_is_ok() {
        assert!(check(SUCCESS, &Site { call: "nrt_execute", rank: 0, what: "" }).is_ok());
    }

    #[test]
    fn memory_codes_are_out_of_memory_with_the_fix() {
        for code in [RESOURCE, FAIL_HOST_MEM_ALLOC] {
            match err(code) {
                Error::OutOfMemory(m) => {
                    assert!(m.contains("rank 1"), "{m}");
                    assert!(m.contains("l0.k_cache") && m.contains("4096 bytes"), "{m}");
                    assert!(m.contains("tp_degree") && m.contains("max_context"), "{m}");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn timeout_numerical_and_unavailable() {
        assert!(matches!(err(TIMEOUT), Error::Backend(m) if m.contains("rank 1 did not answer")));
        assert!(matches!(err(EXEC_COMPLETED_WITH_NUM_ERR), Error::Numerical(m) if m.contains("NaN")));
        assert!(matches!(err(LOAD_NOT_ENOUGH_NC), Error::BackendUnavailable(_)));
        assert!(matches!(err(UNSUPPORTED_NEFF_VERSION), Error::BackendUnavailable(_)));
    }

    #[test]
    fn other_codes_are_backend_errors_naming_the_code() {
        assert!(matches!(err(INVALID), Error::Backend(m) if m.contains("NRT_INVALID (2)") && m.contains("rank 1")));
        assert!(matches!(err(77), Error::Backend(m) if m.contains("returned NRT status 77")));
    }
}
