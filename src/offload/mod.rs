//! Work that can take long runs on tokio's blocking threads, never on the async workers that serve every other
//! request, and at most one job per core at a time in each of two pools: more would only slow each other down,
//! and the bound keeps a flood of such work from spawning threads without end. Provider scripts have a pool of
//! their own, so that clients' bulk work (token counts, large bodies) never holds up the mapping of answers.
//!
//! # Fair turns
//!
//! When every place of a pool is taken, a job waits in its client's queue, and the queues take turns: each place
//! that frees goes to the next client in line, one job per turn, so one client's load delays another's job by one
//! job per place at most, however much it sends. Within a client, the work of requests under way (an answer's
//! mapping, a stream's events) goes before new requests: finishing what was started frees its connection and
//! key. The bounds:
//!
//! - a client has at most [`MAX_WAITING`] new jobs waiting in a pool: one more is refused at once ([`Busy`]);
//! - a new job waits at most [`MAX_WAIT`], or until its request's deadline if that comes first, and is refused
//!   then ([`Busy`]);
//! - the work of a request under way ([`run`]) is never refused: it cannot be undone (a key was spent, a stream
//!   has begun), and there is at most one such job per connection.
//!
//! # Who the client is
//!
//! The address a connection comes from: the HTTP edge runs each connection's task inside [`serving`], and every
//! job started within it (the handler, the relay below it, the stream it answers with) is that client's, read
//! from a task-local. The layers between need not carry it; the relay stays usable without the HTTP server. An
//! IPv6 client is its /64 network, which one host commonly holds whole. Work outside a connection's task (a
//! model list refreshed in a task of its own, a library caller) is the server's own, in one queue of its own.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// New jobs one client may have waiting in one pool; past it, new requests are refused at once.
pub const MAX_WAITING: usize = 32;

/// The longest a new job waits for a place before it is refused.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// The longest `Retry-After` suggested.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Which pool a job runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Provider script calls (each bounded by its budget).
    Scripts,
    /// Work a client's request asks for: counting tokens, parsing a large body.
    Requests,
}

impl Pool {
    pub const ALL: [Pool; 2] = [Pool::Scripts, Pool::Requests];

    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Pool::Scripts => "scripts",
            Pool::Requests => "requests",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Pool::Scripts => "provider scripts",
            Pool::Requests => "token counts and large bodies",
        }
    }
}

/// Whom a job is done for: a client's address (an IPv6 address by its /64 network), or the server itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Client(Option<IpAddr>);

impl Client {
    /// Work of the server's own, or of a caller outside any connection.
    pub const SERVER: Client = Client(None);

    /// The client a connection from `peer` serves.
    pub fn of(peer: IpAddr) -> Self {
        Client(Some(match peer.to_canonical() {
            IpAddr::V6(v6) => {
                let network = u128::from(v6) & !(u128::from(u64::MAX));
                IpAddr::V6(Ipv6Addr::from(network))
            }
            v4 => v4,
        }))
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("the server"),
            Some(IpAddr::V6(network)) => write!(f, "{network}/64"),
            Some(v4) => write!(f, "{v4}"),
        }
    }
}

tokio::task_local! {
    static CLIENT: Client;
}

/// Runs `work` (a connection's task) as `client`'s: the jobs it starts wait in that client's queues.
pub fn serving<F: Future>(client: Client, work: F) -> impl Future<Output = F::Output> {
    CLIENT.scope(client, work)
}

/// The client whose work is running here.
pub fn current() -> Client {
    CLIENT.try_with(|c| *c).unwrap_or(Client::SERVER)
}

/// A new job refused: its client has too many waiting, or it waited too long.
#[derive(Clone, Debug)]
pub struct Busy {
    pub client: Client,
    pub pool: Pool,
    /// The client's new jobs waiting in the pool when it was refused.
    pub waiting: usize,
    /// How long it waited; `None` when it was refused at once.
    pub waited: Option<Duration>,
    /// When a retry may find room: the client's queue served at its share of the pool, from 1 s to 60 s.
    pub retry_after: Duration,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.retry_after.as_secs();
        match self.waited {
            None => write!(
                f,
                "the server is busy with earlier requests from this client ({}): {} are waiting for {} (at most {MAX_WAITING}); retry after {secs}s",
                self.client,
                self.waiting,
                self.pool.what()
            ),
            Some(waited) => write!(
                f,
                "the server is busy: this request waited {:.1}s for {} behind other work and was given up; retry after {secs}s",
                waited.as_secs_f64(),
                self.pool.what()
            ),
        }
    }
}

impl std::error::Error for Busy {}

/// What a pool is doing, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Jobs running.
    pub running: usize,
    /// Jobs waiting for a place.
    pub waiting: usize,
    /// New jobs refused since start.
    pub refused: u64,
}

/// What `pool` is doing now.
pub fn stats(pool: Pool) -> Stats {
    let state = scheduler(pool).lock();
    Stats {
        running: state.taken,
        waiting: state.waiting(),
        refused: state.refused,
    }
}

/// Runs `job`, the work of a request under way (or the server's own), off the async workers once its client's
/// turn comes in `pool`, and returns its result. Never refused. A job keeps its place until it ends, even if the
/// caller stops waiting; a panic in it is raised again in the caller.
pub async fn run<T, F>(pool: Pool, job: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let place = match scheduler(pool).take(current(), None).await {
        Ok(place) => place,
        Err(_) => unreachable!("work under way is never refused"),
    };
    on_blocking_thread(place, job).await
}

/// Runs `job`, a new request's work, like [`run`], unless its client already has [`MAX_WAITING`] new jobs
/// waiting in `pool`, or no place is free for it within [`MAX_WAIT`] or by `deadline`: then it is refused.
pub async fn admit<T, F>(pool: Pool, deadline: Option<Instant>, job: F) -> Result<T, Busy>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let until = Instant::now() + MAX_WAIT;
    let until = deadline.map_or(until, |d| d.min(until));
    let place = scheduler(pool).take(current(), Some(until)).await?;
    Ok(on_blocking_thread(place, job).await)
}

async fn on_blocking_thread<T, F>(place: Place, job: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let done = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let out = job();
        place.done(started.elapsed());
        out
    });
    match done.await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn scheduler(pool: Pool) -> &'static Scheduler {
    static POOLS: OnceLock<[Scheduler; 2]> = OnceLock::new();
    let pools = POOLS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        [
            Scheduler::new(Pool::Scripts, cores.max(2)),
            Scheduler::new(Pool::Requests, cores.max(2)),
        ]
    });
    &pools[pool as usize]
}

/// One pool: its places, and the queues of the clients waiting for one.
struct Scheduler {
    pool: Pool,
    places: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Places taken (a place is handed from a job that ends to the next one waiting, never freed in between).
    taken: usize,
    /// The clients with jobs waiting, in the order their turns come.
    turns: VecDeque<Client>,
    queues: HashMap<Client, Queue>,
    next_id: u64,
    /// How long a job has been taking, on average (recent jobs weigh most), for `Retry-After`.
    mean_job: Duration,
    /// New jobs refused since start.
    refused: u64,
    /// When a refusal was last logged.
    warned: Option<Instant>,
}

/// One client's waiting jobs.
#[derive(Default)]
struct Queue {
    /// Work of requests under way, served first.
    under_way: VecDeque<Waiter>,
    new: VecDeque<Waiter>,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.under_way.is_empty() && self.new.is_empty()
    }
}

struct Waiter {
    id: u64,
    /// Told when a place is handed to this job. It waits on the other end until then, or takes itself out of
    /// the queue (under the lock) before it stops waiting: a send always finds it there.
    place: oneshot::Sender<()>,
}

impl Scheduler {
    fn new(pool: Pool, places: usize) -> Self {
        Self {
            pool,
            places,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a job of `client`: at once when one is free, else at its turn. A new job (with `until`) is
    /// refused when its client has too many waiting or when `until` comes first.
    async fn take(&'static self, client: Client, until: Option<Instant>) -> Result<Place, Busy> {
        let (id, granted) = {
            let mut state = self.lock();
            if state.taken < self.places {
                // Nobody waits while a place is free: jobs queue only when every place is taken.
                state.taken += 1;
                return Ok(Place { scheduler: self });
            }
            let state = &mut *state;
            let queue = state.queues.entry(client).or_default();
            if until.is_some() && queue.new.len() >= MAX_WAITING {
                let waiting = queue.new.len();
                return Err(self.refuse(state, client, waiting, None));
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            if queue.is_empty() {
                state.turns.push_back(client);
            }
            let waiter = Waiter { id, place: tx };
            match until {
                None => queue.under_way.push_back(waiter),
                Some(_) => queue.new.push_back(waiter),
            }
            (id, rx)
        };
        let since = Instant::now();
        let mut waiting = Waiting {
            scheduler: self,
            client,
            id,
            granted: Some(granted),
        };
        let granted = waiting.granted.as_mut().expect("set above");
        let given = match until {
            None => granted.await.is_ok(),
            Some(until) => match tokio::time::timeout_at(until, granted).await {
                Ok(given) => given.is_ok(),
                Err(_) => {
                    let mut state = self.lock();
                    if state.remove(client, id) {
                        waiting.granted = None;
                        let waiting = state.queues.get(&client).map_or(0, |q| q.new.len());
                        return Err(self.refuse(
                            &mut state,
                            client,
                            waiting,
                            Some(since.elapsed()),
                        ));
                    }
                    // Handed a place just as its time ran out: it is taken.
                    true
                }
            },
        };
        // A sender is only ever dropped after sending, or by `remove`, which this job alone calls.
        debug_assert!(given, "a waiting job lost its sender");
        waiting.granted = None;
        Ok(Place { scheduler: self })
    }

    fn refuse(
        &self,
        state: &mut State,
        client: Client,
        waiting: usize,
        waited: Option<Duration>,
    ) -> Busy {
        // The client's queue, served at its share of the places (one turn in as many as there are clients
        // waiting).
        let share = state.turns.len().max(1) as u32;
        let drain = state
            .mean_job
            .saturating_mul(waiting as u32 + 1)
            .saturating_mul(share)
            / self.places as u32;
        let retry_after = Duration::from_secs(drain.as_secs_f64().ceil() as u64)
            .clamp(Duration::from_secs(1), MAX_RETRY_AFTER);
        state.refused += 1;
        let now = Instant::now();
        if state
            .warned
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
        {
            state.warned = Some(now);
            tracing::warn!(
                %client,
                pool = self.pool.what(),
                waiting,
                waited = ?waited,
                "refusing a request: its client has too many waiting, or it waited too long for its turn (503 server_busy; logged at most once a minute per pool)"
            );
        }
        Busy {
            client,
            pool: self.pool,
            waiting,
            waited,
            retry_after,
        }
    }

    /// A job ended: its place goes to the next client in line, or is freed.
    fn release(&self, took: Option<Duration>) {
        let mut state = self.lock();
        if let Some(took) = took {
            // An exponential average over about the last eight jobs.
            state.mean_job = (state.mean_job * 7 + took) / 8;
        }
        if !state.hand_over() {
            state.taken -= 1;
        }
    }
}

impl State {
    /// Jobs waiting, of every client.
    fn waiting(&self) -> usize {
        self.queues
            .values()
            .map(|q| q.under_way.len() + q.new.len())
            .sum()
    }

    /// Gives a place to the job whose turn it is; `false` when nobody waits.
    fn hand_over(&mut self) -> bool {
        while let Some(client) = self.turns.pop_front() {
            let Some(queue) = self.queues.get_mut(&client) else {
                continue;
            };
            let next = queue
                .under_way
                .pop_front()
                .or_else(|| queue.new.pop_front());
            if queue.is_empty() {
                self.queues.remove(&client);
            } else {
                self.turns.push_back(client);
            }
            if let Some(next) = next
                && next.place.send(()).is_ok()
            {
                return true;
            }
        }
        false
    }

    /// Takes job `id` out of `client`'s queue; `false` when it is not there (a place was handed to it).
    fn remove(&mut self, client: Client, id: u64) -> bool {
        let Some(queue) = self.queues.get_mut(&client) else {
            return false;
        };
        let found = [&mut queue.under_way, &mut queue.new]
            .into_iter()
            .find_map(|list| {
                let at = list.iter().position(|w| w.id == id)?;
                list.remove(at)
            });
        if queue.is_empty() {
            self.queues.remove(&client);
            self.turns.retain(|c| *c != client);
        }
        found.is_some()
    }
}

/// A job waiting for its turn. Dropped before it is handed a place (its caller stopped waiting), it leaves the
/// queue; handed one meanwhile, it passes the place on.
struct Waiting {
    scheduler: &'static Scheduler,
    client: Client,
    id: u64,
    /// `None` once the wait is over.
    granted: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.granted.is_none() {
            return;
        }
        let mut state = self.scheduler.lock();
        if !state.remove(self.client, self.id) && !state.hand_over() {
            state.taken -= 1;
        }
    }
}

/// A place in a pool, held by one running job.
struct Place {
    scheduler: &'static Scheduler,
}

impl Place {
    /// The job ended after `took`.
    fn done(self, took: Duration) {
        self.scheduler.release(Some(took));
        std::mem::forget(self);
    }
}

impl Drop for Place {
    /// The job panicked (or never ran).
    fn drop(&mut self) {
        self.scheduler.release(None);
    }
}

#[cfg(test)]
mod tests;
