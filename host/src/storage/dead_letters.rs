//! Pruning the `dead_letters` table, which the pipeline writes (see
//! `engine::pipeline`). Plugin SQL may read it but not write it (see
//! [`crate::storage::plugin_sql`]): a plugin that could delete dead letters
//! could pick out the evidence of its own failures. Plugins prune through
//! this, by age and number only, oldest first.

use rusqlite::Connection;

/// Deletes the dead letters recorded before `before_ms`, then all but the
/// newest `keep` (by id), inside the caller's transaction; returns how many
/// of each went.
pub fn prune(conn: &Connection, before_ms: i64, keep: u64) -> rusqlite::Result<(u64, u64)> {
    let expired = conn
        .prepare_cached("DELETE FROM dead_letters WHERE at_ms < ?1")?
        .execute([before_ms])?;
    // Everything at or below the id of the first row past the newest
    // `keep`; with fewer rows than that, the subquery is NULL and nothing
    // matches.
    let excess = conn
        .prepare_cached(
            "DELETE FROM dead_letters WHERE id <= \
             (SELECT id FROM dead_letters ORDER BY id DESC LIMIT 1 OFFSET ?1)",
        )?
        .execute([i64::try_from(keep).unwrap_or(i64::MAX)])?;
    Ok((expired as u64, excess as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunes_the_expired_then_keeps_the_newest() {
        let conn = crate::storage::db::open_in_memory().unwrap();
        for at in [10, 20, 30, 40, 50] {
            conn.execute(
                "INSERT INTO dead_letters(at_ms, handler, reason, envelope) VALUES (?1, 'h', 'r', '{}')",
                [at],
            )
            .unwrap();
        }
        assert_eq!(prune(&conn, 25, 2).unwrap(), (2, 1));
        let left: Vec<i64> = conn
            .prepare("SELECT at_ms FROM dead_letters ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(left, [40, 50]);
        assert_eq!(prune(&conn, 0, u64::MAX).unwrap(), (0, 0));
    }
}
