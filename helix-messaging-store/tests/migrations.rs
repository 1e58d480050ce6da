//! Schema migrations: each table records the version it was brought to, a store opens a
//! table recorded at a newer version than it knows only to refuse it, and (PostgreSQL) a
//! table dropped by hand is made again, and several instances migrating one new table at
//! once all come up.

#[cfg(feature = "sqlite")]
mod sqlite {
    use helix_messaging_core::ErrorKind;
    use helix_messaging_core::fallback::{Spool, SpoolLimits};
    use helix_messaging_store::{SqliteDeadLetterStore, SqliteSpool};
    use rusqlite::Connection;

    use std::path::PathBuf;

    /// A file of the test's own, removed afterwards even when the test fails.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new() -> TempFile {
            TempFile(std::env::temp_dir().join(format!(
                "helix-migrations-{}.sqlite",
                uuid::Uuid::new_v4().simple()
            )))
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
            }
        }
    }

    fn versions(file: &TempFile) -> Vec<(String, i64)> {
        let c = Connection::open(&file.0).unwrap();
        let mut rows = c
            .prepare("SELECT table_name, version FROM helix_schema_versions ORDER BY table_name")
            .unwrap();
        rows.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_table_records_the_version_it_was_brought_to() {
        let file = TempFile::new();
        let store = SqliteDeadLetterStore::open(&file.0).await.unwrap();
        let replays = store.replay_store().await.unwrap();
        drop((store, replays));
        let spool = SqliteSpool::open(&file.0, SpoolLimits::default())
            .await
            .unwrap();
        drop(spool);
        assert_eq!(
            versions(&file),
            [
                ("helix_dead_letters".to_owned(), 4),
                ("helix_replays".to_owned(), 2),
                ("helix_spool".to_owned(), 1)
            ]
        );
        // Opening again applies nothing and records the same.
        drop(SqliteDeadLetterStore::open(&file.0).await.unwrap());
        assert_eq!(versions(&file)[0], ("helix_dead_letters".to_owned(), 4));
        // Step 4: the listing's index carries the status (discarded entries are left out).
        let indexes: Vec<String> = rusqlite::Connection::open(&file.0)
            .unwrap()
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'helix_dead_letters'")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            indexes.contains(&"helix_dead_letters_by_time_status".to_owned())
                && !indexes.contains(&"helix_dead_letters_by_time".to_owned()),
            "{indexes:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_dropped_by_hand_is_made_again_despite_its_recorded_version() {
        let file = TempFile::new();
        drop(
            SqliteSpool::open(&file.0, SpoolLimits::default())
                .await
                .unwrap(),
        );
        Connection::open(&file.0)
            .unwrap()
            .execute_batch("DROP TABLE helix_spool_refused")
            .unwrap();
        let spool = SqliteSpool::open(&file.0, SpoolLimits::default())
            .await
            .expect("the table is made again");
        assert!(spool.refused(10).await.unwrap().is_empty());
        assert_eq!(versions(&file), [("helix_spool".to_owned(), 1)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_from_a_newer_build_is_refused_not_written() {
        let file = TempFile::new();
        drop(SqliteDeadLetterStore::open(&file.0).await.unwrap());
        Connection::open(&file.0)
            .unwrap()
            .execute(
                "UPDATE helix_schema_versions SET version = 9 WHERE table_name = 'helix_dead_letters'",
                [],
            )
            .unwrap();
        let err = SqliteDeadLetterStore::open(&file.0)
            .await
            .expect_err("a newer schema");
        assert_eq!(err.kind(), ErrorKind::Backend);
        let text = err.to_string();
        assert!(
            text.contains("helix_dead_letters") && text.contains("schema version 9"),
            "{text}"
        );
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use helix_messaging_core::dlq::DeadLetterStore;
    use helix_messaging_store::PostgresDeadLetterStore;

    fn connection() -> String {
        std::env::var("HELIX_TEST_POSTGRES")
            .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
    }

    /// A table of the test's own, dropped (with its version) afterwards even when the test
    /// fails.
    struct Table(String);

    impl Drop for Table {
        fn drop(&mut self) {
            let table = self.0.clone();
            let _ = std::thread::spawn(move || {
                tokio::runtime::Runtime::new().unwrap().block_on(async {
                    let (client, conn) =
                        tokio_postgres::connect(&connection(), tokio_postgres::NoTls)
                            .await
                            .unwrap();
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!(
                            "DROP TABLE IF EXISTS {table};
                             DELETE FROM helix_schema_versions WHERE table_name = '{table}'"
                        ))
                        .await;
                })
            })
            .join();
        }
    }

    async fn client() -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&connection(), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test starts it)");
        tokio::spawn(conn);
        client
    }

    async fn version(client: &tokio_postgres::Client, table: &str) -> Option<i64> {
        client
            .query_opt(
                "SELECT version FROM helix_schema_versions WHERE table_name = $1",
                &[&table],
            )
            .await
            .unwrap()
            .map(|r| r.get(0))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_starting_at_once_all_migrate_one_new_table() {
        let table = Table(format!("hm_test_mig_{}", uuid::Uuid::new_v4().simple()));
        let config = connection();
        let opens = (0..6).map(|_| PostgresDeadLetterStore::connect_table(&config, &table.0));
        for store in futures::future::join_all(opens).await {
            let store = store.expect("every instance comes up");
            assert_eq!(store.stats().await.unwrap().depth, 0);
        }
        assert_eq!(version(&client().await, &table.0).await, Some(4));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_dropped_by_hand_is_made_again_despite_its_recorded_version() {
        let table = Table(format!("hm_test_mig_{}", uuid::Uuid::new_v4().simple()));
        drop(
            PostgresDeadLetterStore::connect_table(&connection(), &table.0)
                .await
                .unwrap(),
        );
        let client = client().await;
        client
            .batch_execute(&format!("DROP TABLE {}", table.0))
            .await
            .unwrap();
        assert_eq!(version(&client, &table.0).await, Some(4), "still recorded");
        let store = PostgresDeadLetterStore::connect_table(&connection(), &table.0)
            .await
            .unwrap();
        assert_eq!(store.stats().await.unwrap().depth, 0, "the table is back");
    }
}
