//! The scheduler's turns, bounds and refusals.

use super::*;
use std::sync::Arc;

fn one_place() -> &'static Scheduler {
    Box::leak(Box::new(Scheduler::new(Pool::Scripts, 1)))
}

fn client(last: u8) -> Client {
    Client::of(IpAddr::from([127, 0, 0, last]))
}

fn far() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(3600))
}

/// Queues a job of `who` named `name` that, at its turn, writes its name into `order` and ends. Returns once
/// it waits in line.
async fn queue(
    pool: &'static Scheduler,
    who: Client,
    until: Option<Instant>,
    name: &'static str,
    order: &Arc<Mutex<Vec<&'static str>>>,
) -> tokio::task::JoinHandle<Result<(), Busy>> {
    let order = order.clone();
    let waiting_before = pool.lock().waiting();
    let job = tokio::spawn(async move {
        let place = pool.take(who, until).await?;
        order.lock().unwrap().push(name);
        drop(place);
        Ok(())
    });
    while pool.lock().waiting() == waiting_before {
        tokio::task::yield_now().await;
    }
    job
}

#[tokio::test]
async fn places_go_to_the_waiting_clients_in_turn_and_work_under_way_first() {
    let pool = one_place();
    let order = Arc::new(Mutex::new(Vec::new()));
    let (a, b) = (client(2), client(3));
    let held = pool.take(a, far()).await.unwrap();
    let mut jobs = Vec::new();
    for name in ["a1", "a2", "a3", "a4"] {
        jobs.push(queue(pool, a, far(), name, &order).await);
    }
    jobs.push(queue(pool, b, far(), "b1", &order).await);
    jobs.push(queue(pool, a, None, "a-under-way", &order).await);
    drop(held);
    for job in jobs {
        job.await.unwrap().unwrap();
    }
    // One job of each client in turn; within a client, the work of a request under way first.
    assert_eq!(
        *order.lock().unwrap(),
        ["a-under-way", "b1", "a1", "a2", "a3", "a4"]
    );
    assert_eq!(pool.lock().taken, 0);
}

#[tokio::test]
async fn a_client_over_its_bound_is_refused_at_once_and_nobody_else_is() {
    let pool = one_place();
    let order = Arc::new(Mutex::new(Vec::new()));
    let (a, b) = (client(2), client(3));
    let held = pool.take(a, far()).await.unwrap();
    let mut jobs = Vec::new();
    for _ in 0..MAX_WAITING {
        jobs.push(queue(pool, a, far(), "a", &order).await);
    }
    let busy = pool.take(a, far()).await.err().expect("refused");
    assert_eq!((busy.waiting, busy.waited), (MAX_WAITING, None));
    assert!(busy.retry_after >= Duration::from_secs(1), "{busy:?}");
    assert!(busy.to_string().contains("127.0.0.2"), "{busy}");
    // Work under way, and another client's new work, still wait their turn.
    jobs.push(queue(pool, a, None, "a-under-way", &order).await);
    jobs.push(queue(pool, b, far(), "b", &order).await);
    assert_eq!(pool.lock().refused, 1);
    drop(held);
    for job in jobs {
        job.await.unwrap().unwrap();
    }
    assert_eq!(order.lock().unwrap().len(), MAX_WAITING + 2);
}

#[tokio::test(start_paused = true)]
async fn a_new_job_that_waits_too_long_is_refused_and_one_given_up_leaves_the_line() {
    let pool = one_place();
    let order = Arc::new(Mutex::new(Vec::new()));
    let (a, b) = (client(2), client(3));
    let held = pool.take(a, far()).await.unwrap();
    let late = queue(
        pool,
        b,
        Some(Instant::now() + Duration::from_secs(2)),
        "late",
        &order,
    )
    .await;
    let gone = queue(pool, a, far(), "gone", &order).await;
    gone.abort();
    let busy = late.await.unwrap().expect_err("refused after its wait");
    assert_eq!(busy.waited, Some(Duration::from_secs(2)));
    assert!(busy.to_string().contains("waited 2.0s"), "{busy}");
    let state = pool.lock();
    assert!(state.queues.is_empty() && state.turns.is_empty());
    drop(state);
    drop(held);
    assert_eq!(pool.lock().taken, 0);
    assert!(order.lock().unwrap().is_empty());
}

#[test]
fn an_ipv6_client_is_its_network_and_a_mapped_ipv4_one_its_address() {
    let a = Client::of("2001:db8:1:2:aaaa::1".parse().unwrap());
    let b = Client::of("2001:db8:1:2:bbbb::2".parse().unwrap());
    assert_eq!(a, b);
    assert_eq!(a.to_string(), "2001:db8:1:2::/64");
    let v4 = Client::of("::ffff:127.0.0.2".parse().unwrap());
    assert_eq!(v4, Client::of("127.0.0.2".parse().unwrap()));
    assert_eq!(v4.to_string(), "127.0.0.2");
    assert_ne!(v4, Client::SERVER);
}
