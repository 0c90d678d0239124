package jetstream

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	njs "github.com/nats-io/nats.go/jetstream"

	"github.com/batonmail/baton/queue"
)

// Config configures a Queue. The zero value connects to nats://127.0.0.1:4222
// without credentials and uses the buckets baton_queue and baton_bodies with
// one replica.
type Config struct {
	// URL lists the NATS servers to connect to, comma-separated
	// ("nats://n1:4222,nats://n2:4222"); default nats.DefaultURL. The
	// client reconnects to any of them (and to cluster members they
	// announce) when a connection breaks.
	URL string
	// Conn is an existing connection to use instead of dialing URL; the
	// queue does not close it. The connection options below are then
	// ignored.
	Conn *nats.Conn
	// Name is the client connection name the NATS server shows in its
	// monitoring (default "baton").
	Name string
	// Node names this process among those sharing the queue; leases
	// record it. When it is set, Open ends the leases that an earlier
	// process with the same Node left behind (it crashed or was
	// restarted), so their messages are due again at once instead of
	// after the lease time. Give every process sharing a queue its own
	// Node (relayd uses the host name); a process that opens with the
	// Node of one still running takes its leases, and their messages may
	// be delivered twice. Empty leaves every lease to expire.
	Node string

	// CredsFile is a NATS credentials file (a user JWT and its NKey seed).
	CredsFile string
	// NKeyFile is a file holding a user NKey seed.
	NKeyFile string
	// User and Password authenticate with a user name and password.
	User     string
	Password string
	// Token authenticates with a token.
	Token string
	// TLS, when set, is the TLS configuration for the connection.
	TLS *tls.Config
	// CAFile is a PEM file of CAs that verify the servers' certificates.
	CAFile string
	// CertFile and KeyFile are a client certificate and its key, for
	// servers that verify clients.
	CertFile string
	KeyFile  string

	// Prefix names the JetStream resources: the key-value bucket
	// Prefix+"_queue" holds message records and the stream
	// Prefix+"_bodies" holds bodies (default "baton"). Relays that share
	// a queue use the same prefix; separate queues on one cluster use
	// different ones. Letters, digits, '-' and '_' only.
	Prefix string
	// Replicas is the number of copies JetStream keeps of every record
	// and body (default 1; use 3 on a three-node cluster). It applies
	// when the buckets are created; existing buckets keep theirs.
	Replicas int
	// MaxBytes caps the storage of the bodies stream (0: no cap beyond
	// the server's own limits). An Enqueue that would pass it fails with
	// an error matching queue.ErrNoSpace.
	MaxBytes int64
	// ChunkSize is the size of the pieces bodies are stored in (default
	// 128 KiB, and never more than the server's max_payload allows).
	ChunkSize int
	// Timeout bounds each request to the server, whatever the caller's
	// context allows (default 5 seconds): a request in flight when the
	// server dies gets no reply, and the NATS client does not end it when
	// the connection drops, so only a deadline does.
	Timeout time.Duration
	// SweepInterval is how often the queue looks for bodies left behind
	// by a process that died between storing a body and its record
	// (default 1 hour; negative disables the sweep).
	SweepInterval time.Duration

	// Schedule decides retry times and the maximum age.
	Schedule queue.Schedule
	// Now returns the current time; nil means time.Now. Every process
	// sharing a queue must use the same clock (lease expiry and due times
	// are compared across processes), so only tests set it.
	Now func() time.Time
	// Logger receives the queue's logs; nil discards them.
	Logger *slog.Logger
}

// Queue is a queue.Queue kept in NATS JetStream. Several processes may open
// the same queue (the same Prefix on the same NATS cluster) and lease from
// it concurrently; see the package documentation for how. Open creates one.
type Queue struct {
	cfg        Config
	log        *slog.Logger
	nc         *nats.Conn
	ownConn    bool
	js         njs.JetStream
	kv         njs.KeyValue
	bodies     njs.Stream
	bodiesName string // the bodies stream, also its subjects' first token
	maxRec     int    // largest record or chunk the server takes
	chunk      int    // body chunk size
	now        func() time.Time
	maxWait    time.Duration // longest Lease sleep between index checks

	idx *index

	lmu    sync.Mutex
	leases map[string]leaseCache // by token, leases this process took

	closed    chan struct{}
	closeOnce sync.Once
	bg        sync.WaitGroup
}

var (
	_ queue.Queue        = (*Queue)(nil)
	_ queue.StreamLeaser = (*Queue)(nil)
)

// Open connects to NATS (unless cfg.Conn is set), creates the queue's
// buckets if they do not exist yet, loads the index of queued messages and
// returns the queue. Close releases it.
func Open(ctx context.Context, cfg Config) (*Queue, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = "baton"
	}
	if strings.Trim(cfg.Prefix, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_") != "" {
		return nil, fmt.Errorf("jetstream: invalid prefix %q", cfg.Prefix)
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.ChunkSize <= 0 {
		cfg.ChunkSize = 128 << 10
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.SweepInterval == 0 {
		cfg.SweepInterval = time.Hour
	}
	cfg.Schedule = cfg.Schedule.WithDefaults()
	q := &Queue{cfg: cfg, log: cfg.Logger, now: cfg.Now, closed: make(chan struct{}), maxWait: time.Minute}
	if q.log == nil {
		q.log = slog.New(slog.DiscardHandler)
	}
	if q.now == nil {
		q.now = time.Now
	} else {
		// An injected clock can jump without anything in NATS changing:
		// look at it often.
		q.maxWait = 100 * time.Millisecond
	}
	q.idx = newIndex()
	q.leases = make(map[string]leaseCache)

	if cfg.Conn != nil {
		q.nc = cfg.Conn
	} else {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		dial := cfg.Timeout
		if dl, ok := ctx.Deadline(); ok {
			dial = max(min(dial, time.Until(dl)), time.Millisecond)
		}
		nc, err := connect(cfg, dial, q.log)
		if err != nil {
			return nil, err
		}
		q.nc, q.ownConn = nc, true
	}
	if err := q.setup(ctx); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

// connect dials NATS with the options of cfg, giving up on a server after
// timeout.
func connect(cfg Config, timeout time.Duration, log *slog.Logger) (*nats.Conn, error) {
	url := cfg.URL
	if url == "" {
		url = nats.DefaultURL
	}
	name := cfg.Name
	if name == "" {
		name = "baton"
	}
	opts := []nats.Option{
		nats.Name(name),
		nats.Timeout(timeout),
		nats.MaxReconnects(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) { log.Info("nats reconnected", "server", c.ConnectedUrlRedacted()) }),
	}
	if cfg.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(cfg.CredsFile))
	}
	if cfg.NKeyFile != "" {
		o, err := nats.NkeyOptionFromSeed(cfg.NKeyFile)
		if err != nil {
			return nil, fmt.Errorf("jetstream: nkey: %w", err)
		}
		opts = append(opts, o)
	}
	if cfg.User != "" || cfg.Password != "" {
		opts = append(opts, nats.UserInfo(cfg.User, cfg.Password))
	}
	if cfg.Token != "" {
		opts = append(opts, nats.Token(cfg.Token))
	}
	if cfg.TLS != nil {
		opts = append(opts, nats.Secure(cfg.TLS.Clone()))
	}
	if cfg.CAFile != "" {
		opts = append(opts, nats.RootCAs(cfg.CAFile))
	}
	if cfg.CertFile != "" || cfg.KeyFile != "" {
		opts = append(opts, nats.ClientCert(cfg.CertFile, cfg.KeyFile))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("jetstream: connect: %w", err)
	}
	return nc, nil
}

// setup binds (creating where needed) the buckets and starts the index.
func (q *Queue) setup(ctx context.Context) error {
	js, err := njs.New(q.nc, njs.WithDefaultTimeout(q.cfg.Timeout))
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	q.js = js
	records := q.cfg.Prefix + "_queue"
	q.bodiesName = q.cfg.Prefix + "_bodies"

	q.kv, err = js.KeyValue(ctx, records)
	if errors.Is(err, njs.ErrBucketNotFound) {
		q.kv, err = js.CreateKeyValue(ctx, njs.KeyValueConfig{
			Bucket:      records,
			Description: "baton queue: one record per queued message",
			History:     1,
			Storage:     njs.FileStorage,
			Replicas:    q.cfg.Replicas,
			// Delete markers of finished messages disappear after a
			// while instead of piling up.
			LimitMarkerTTL: markerTTL,
		})
		if errors.Is(err, njs.ErrBucketExists) || isStreamExists(err) {
			// Another process created it at the same time.
			q.kv, err = js.KeyValue(ctx, records)
		}
	}
	if err != nil {
		return fmt.Errorf("jetstream: bucket %s: %w", records, err)
	}

	// JetStream may serve a KV read from any replica ("direct get"),
	// which can miss a write just made through the leader; leases need
	// to read their own writes, so reads go to the leader.
	if err := q.leaderReads(ctx, "KV_"+records); err != nil {
		return err
	}
	q.kv, err = js.KeyValue(ctx, records)
	if err != nil {
		return fmt.Errorf("jetstream: bucket %s: %w", records, err)
	}

	q.bodies, err = js.Stream(ctx, q.bodiesName)
	if errors.Is(err, njs.ErrStreamNotFound) {
		q.bodies, err = js.CreateStream(ctx, njs.StreamConfig{
			Name:        q.bodiesName,
			Description: "baton queue: message bodies, in chunks, one subject per message",
			Subjects:    []string{q.bodiesName + ".*"},
			Storage:     njs.FileStorage,
			Replicas:    q.cfg.Replicas,
			MaxBytes:    q.maxBytes(),
			// A full stream refuses new bodies; it never drops old ones.
			Discard: njs.DiscardNew,
		})
		if isStreamExists(err) {
			q.bodies, err = js.Stream(ctx, q.bodiesName)
		}
	}
	if err != nil {
		return fmt.Errorf("jetstream: stream %s: %w", q.bodiesName, err)
	}

	// Leave room for the headers JetStream adds to a record or chunk.
	q.maxRec = int(q.nc.MaxPayload()) - 4096
	q.chunk = min(q.cfg.ChunkSize, q.maxRec)

	if err := q.startIndex(ctx); err != nil {
		return err
	}
	if q.cfg.Node != "" {
		if err := q.reclaim(ctx); err != nil {
			return err
		}
	}
	if q.cfg.SweepInterval > 0 {
		q.bg.Add(1)
		go q.sweeper()
	}
	return nil
}

// maxBytes is the bodies stream's byte limit (-1: none).
func (q *Queue) maxBytes() int64 {
	if q.cfg.MaxBytes > 0 {
		return q.cfg.MaxBytes
	}
	return -1
}

// leaderReads turns off direct gets on a stream.
func (q *Queue) leaderReads(ctx context.Context, name string) error {
	st, err := q.js.Stream(ctx, name)
	if err != nil {
		return fmt.Errorf("jetstream: stream %s: %w", name, err)
	}
	cfg := st.CachedInfo().Config
	if !cfg.AllowDirect {
		return nil
	}
	cfg.AllowDirect = false
	if _, err := q.js.UpdateStream(ctx, cfg); err != nil {
		return fmt.Errorf("jetstream: stream %s: %w", name, err)
	}
	return nil
}

// markerTTL is how long the delete marker of a finished message stays in
// the records bucket. Watchers that are connected see it at once; the TTL
// only bounds the space markers take.
const markerTTL = 15 * time.Minute

func isStreamExists(err error) bool {
	var apiErr *njs.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == njs.JSErrCodeStreamNameInUse
}

// Close stops the queue: pending Lease calls and later calls return
// queue.ErrClosed. It closes the NATS connection when Open made it.
func (q *Queue) Close() error {
	q.closeOnce.Do(func() {
		close(q.closed)
		q.bg.Wait()
		if q.ownConn {
			q.nc.Close()
		}
	})
	return nil
}

func (q *Queue) isClosed() bool {
	select {
	case <-q.closed:
		return true
	default:
		return false
	}
}

// fail turns an error into what the queue contract promises: ErrClosed
// after Close, ErrNoSpace for storage limits, the error otherwise.
func (q *Queue) fail(err error) error {
	if err == nil {
		return nil
	}
	if q.isClosed() || errors.Is(err, nats.ErrConnectionClosed) && q.ownConn {
		return queue.ErrClosed
	}
	if isNoSpace(err) {
		return errors.Join(queue.ErrNoSpace, err)
	}
	return err
}

// isNoSpace reports whether err is JetStream refusing a write for lack of
// storage: the account's or server's limits, or a bucket's MaxBytes.
func isNoSpace(err error) bool {
	var apiErr *njs.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	switch apiErr.ErrorCode {
	case 10002, 10023, 10047: // account resources, insufficient resources, storage resources
		return true
	case 10077: // store failed: the reason is in the text
		return strings.Contains(apiErr.Description, "maximum bytes")
	}
	return false
}

// stopWatcher stops w and drains what it still delivers, so that the
// subscription's callback, which blocks on a full channel, can return.
func stopWatcher(w njs.KeyWatcher) {
	w.Stop()
	go func() {
		for range w.Updates() {
		}
	}()
}

// Destroy deletes the queue's bucket and stream with every message in
// them, for every process sharing the queue, and closes q. It is meant for
// tests and for taking a queue out of service; it cannot be undone.
func (q *Queue) Destroy(ctx context.Context) error {
	if q.isClosed() {
		return queue.ErrClosed
	}
	records := q.kv.Bucket()
	q.Close()
	js, err := njs.New(q.nc)
	if err != nil {
		return err
	}
	if q.ownConn {
		// Close closed it: dial again for the deletion.
		nc, err := connect(q.cfg, q.cfg.Timeout, q.log)
		if err != nil {
			return err
		}
		defer nc.Close()
		if js, err = njs.New(nc); err != nil {
			return err
		}
	}
	return errors.Join(js.DeleteKeyValue(ctx, records), js.DeleteStream(ctx, q.bodiesName))
}

// bounded limits ctx to one request's time (Config.Timeout); see Timeout.
func (q *Queue) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, q.cfg.Timeout)
}
