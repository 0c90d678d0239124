package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/BurntSushi/toml"
)

// Config is relayd's configuration file (TOML). Every field has a default
// (see defaultConfig), so an empty or missing file runs a working relay on
// loopback.
type Config struct {
	// Hostname is the name relayd uses in its greeting, EHLO and Received
	// headers.
	Hostname string `toml:"hostname"`
	// DataDir holds the queue, the users file and generated certificates.
	DataDir string `toml:"data_dir"`

	SMTP     SMTPConfig     `toml:"smtp"`
	TLS      TLSConfig      `toml:"tls"`
	Auth     AuthConfig     `toml:"auth"`
	DNS      DNSConfig      `toml:"dns"`
	Routes   []RouteConfig  `toml:"routes"`
	Queue    QueueConfig    `toml:"queue"`
	Delivery DeliveryConfig `toml:"delivery"`
	DKIM     DKIMConfig     `toml:"dkim"`
	Suppress SuppressConfig `toml:"suppress"`
	Log      LogConfig      `toml:"log"`
	// Webhooks receive delivery events as signed JSON batches (see
	// docs/webhooks.md).
	Webhooks []WebhookConfig `toml:"webhooks"`
	// Metrics serves Prometheus metrics (see docs/metrics.md).
	Metrics MetricsConfig `toml:"metrics"`
	// Streams configures mail streams by name ([streams.bulk]); see
	// StreamConfig.
	Streams map[string]StreamConfig `toml:"streams"`
	// Admin serves the admin HTTP API and dashboard (docs/admin-api.md).
	Admin AdminConfig `toml:"admin"`
}

// SMTPConfig configures the submission listeners.
type SMTPConfig struct {
	// Listen are STARTTLS listeners (port 587/25 style).
	Listen []string `toml:"listen"`
	// ListenTLS are implicit TLS listeners (port 465 style).
	ListenTLS []string `toml:"listen_tls"`
	// InsecureAuth allows AUTH without TLS (never on a public network).
	InsecureAuth bool `toml:"insecure_auth"`
	// MaxSize is the largest accepted message in bytes.
	MaxSize int64 `toml:"max_size"`
	// MaxRecipients caps recipients per message.
	MaxRecipients int `toml:"max_recipients"`
	// MaxConnsPerIP caps simultaneous connections from one client
	// address (default 200).
	MaxConnsPerIP int `toml:"max_conns_per_ip"`
	// StreamHeader names the header field by which a message chooses its
	// stream when its sender's identity does not pin one (default
	// "X-Baton-Stream"); it is removed before the message is queued.
	StreamHeader string `toml:"stream_header"`
}

// TLSConfig names the certificate for the listeners; when both are empty a
// self-signed certificate is generated in the data directory.
type TLSConfig struct {
	CertFile string `toml:"cert_file"`
	KeyFile  string `toml:"key_file"`
}

// AuthConfig says who may submit.
type AuthConfig struct {
	// UsersFile is the bcrypt password file (default DataDir/users); see
	// auth.PasswordFile for its format, and "relayd user" to edit it.
	UsersFile string `toml:"users_file"`
	// APIKeysFile holds hashed API keys (default DataDir/apikeys); see
	// "relayd apikey".
	APIKeysFile string `toml:"api_keys_file"`
	// APIKeyUser is the AUTH user name under which clients present an API
	// key as the password (default "apikey").
	APIKeyUser string `toml:"api_key_user"`
	// BcryptCost is the cost of new password hashes (default 10).
	BcryptCost int `toml:"bcrypt_cost"`
	// Allow lists networks that may relay without AUTH.
	Allow []AllowConfig `toml:"allow"`
}

// AllowConfig is one allow-listed network group: clients from CIDR relay
// without AUTH under identity Name, with the restrictions below.
type AllowConfig struct {
	Name string `toml:"name"`
	// CIDR lists prefixes or single addresses, IPv4 or IPv6.
	CIDR []string `toml:"cidr"`
	// SenderDomains and SenderAddrs restrict envelope and header senders;
	// both empty means any sender.
	SenderDomains []string `toml:"sender_domains"`
	SenderAddrs   []string `toml:"sender_addrs"`
	// MaxSize caps one message in bytes (0: the server's limit).
	MaxSize int64 `toml:"max_size"`
	// Messages and Recipients per Per (a Go duration such as "1h") limit
	// the group's rate as one identity; zero means unlimited.
	Messages   int    `toml:"messages"`
	Recipients int    `toml:"recipients"`
	Per        string `toml:"per"`
	// Sandbox captures the group's mail instead of delivering it.
	Sandbox bool `toml:"sandbox"`
	// Stream puts all the group's mail in this stream (empty: the
	// message's stream header decides).
	Stream string `toml:"stream"`
}

// DNSConfig configures the resolver.
type DNSConfig struct {
	// Servers are host:port addresses; empty means /etc/resolv.conf.
	Servers []string `toml:"servers"`
	// Timeout per query, as a Go duration ("5s").
	Timeout string `toml:"timeout"`
	// AllowLocal lets MX hosts resolve to loopback and private addresses
	// (off: such addresses are skipped, so DNS cannot point the relay at
	// internal services). Static routes to IP literals are not affected.
	AllowLocal bool `toml:"allow_local"`
	// NoMTASTS turns off MTA-STS (RFC 8461) policy discovery.
	NoMTASTS bool `toml:"no_mta_sts"`
}

// RouteConfig sends mail for a domain (or "*" for everything) to fixed
// hosts instead of MX lookup.
type RouteConfig struct {
	Domain   string `toml:"domain"`
	Host     string `toml:"host"`
	Port     int    `toml:"port"`
	Username string `toml:"username"`
	Password string `toml:"password"`
	// TLS is "opportunistic" (default), "none", "required" or "verified".
	TLS string `toml:"tls"`
}

// QueueConfig configures the queue and its retry schedule.
type QueueConfig struct {
	// Backend is "file" (default), "nats" (a NATS JetStream queue shared
	// by several relayd nodes, see docs/nats.md) or "memory".
	Backend string `toml:"backend"`
	// NATS configures the "nats" backend.
	NATS NATSQueueConfig `toml:"nats"`
	// RetryMin, RetryMax and MaxAge are Go durations.
	RetryMin string `toml:"retry_min"`
	RetryMax string `toml:"retry_max"`
	MaxAge   string `toml:"max_age"`
}

// DeliveryConfig configures outbound delivery.
type DeliveryConfig struct {
	// Workers caps concurrent deliveries in all.
	Workers int `toml:"workers"`
	// PerDestination caps concurrent connections to one destination.
	PerDestination int `toml:"per_destination"`
	// Rate caps messages per second to one destination (0: no cap).
	Rate float64 `toml:"rate"`
	// MaxRcpts caps recipients per SMTP transaction (default 100).
	MaxRcpts int `toml:"max_rcpts"`
	// DelayWarning, a Go duration, sends senders a delay notice once a
	// message has waited this long (empty: never).
	DelayWarning string `toml:"delay_warning"`
	// Destinations override the limits and the TLS requirement for a
	// domain, or for a route key ("route:NAME").
	Destinations []DestinationConfig `toml:"destinations"`
}

// DestinationConfig sets limits for one destination.
type DestinationConfig struct {
	Domain         string  `toml:"domain"`
	PerDestination int     `toml:"per_destination"`
	Rate           float64 `toml:"rate"`
	Burst          int     `toml:"burst"`
	MaxRcpts       int     `toml:"max_rcpts"`
	// TLS is "", "none", "opportunistic", "required" or "verified".
	TLS string `toml:"tls"`
}

// StreamConfig configures one mail stream (relay.StreamConfig). Every
// message is in a stream: "transactional" (the default) and "bulk" always
// exist; others are added by naming them. Zero values take the defaults:
// transactional may use all delivery.workers and has a quarter reserved,
// other streams may use half and reserve none; the per-destination limits
// default to delivery's. Each stream has its own per-destination
// connections and limits, so a bulk backlog never holds up transactional
// mail.
type StreamConfig struct {
	// Workers caps the stream's deliveries in progress, out of
	// delivery.workers.
	Workers int `toml:"workers"`
	// Reserved workers only this stream may use (negative: none).
	Reserved int `toml:"reserved"`
	// MaxInFlight caps the stream's leased messages (default 4 ×
	// workers).
	MaxInFlight int `toml:"max_in_flight"`
	// PerDestination, Rate, Burst and MaxRcpts are the stream's limits
	// per destination, as in [delivery] and its destinations.
	PerDestination int     `toml:"per_destination"`
	Rate           float64 `toml:"rate"`
	Burst          int     `toml:"burst"`
	MaxRcpts       int     `toml:"max_rcpts"`
	// Destinations override the stream's limits for a domain or route
	// key; tls may not be set here (it is per domain, in [delivery]).
	Destinations []DestinationConfig `toml:"destinations"`
}

// DKIMConfig lists signing keys. Mail whose From domain has keys is
// signed with each of them at submission.
type DKIMConfig struct {
	Keys []DKIMKeyConfig `toml:"keys"`
	// ParentDomains signs mail from a subdomain without keys of its own
	// with the keys of its nearest parent domain.
	ParentDomains bool `toml:"parent_domains"`
	// Headers lists the header fields to sign when present; empty means
	// the dkim package's DefaultHeaders. From is always signed.
	Headers []string `toml:"headers"`
}

// DKIMKeyConfig is one signing key.
type DKIMKeyConfig struct {
	Domain   string `toml:"domain"`
	Selector string `toml:"selector"`
	KeyFile  string `toml:"key_file"`
}

// LogConfig configures logging.
type LogConfig struct {
	// Level is "debug", "info" (default), "warn" or "error".
	Level string `toml:"level"`
	// Format is "text" (default) or "json".
	Format string `toml:"format"`
}

// defaultConfig is what relayd runs on without a configuration file: a
// relay on loopback that keeps its state under ./relayd-data.
func defaultConfig() *Config {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	return &Config{
		Hostname: host,
		DataDir:  "relayd-data",
		SMTP: SMTPConfig{
			Listen:        []string{"127.0.0.1:2525"},
			ListenTLS:     []string{"127.0.0.1:2465"},
			MaxSize:       25 << 20,
			MaxRecipients: 100,
			MaxConnsPerIP: 200,
		},
		Queue:    QueueConfig{Backend: "file"},
		Delivery: DeliveryConfig{Workers: 100, PerDestination: 20},
		Log:      LogConfig{Level: "info", Format: "text"},
	}
}

// loadConfig reads path (if not empty) over the defaults and fills the
// paths that depend on the data directory.
func loadConfig(path string) (*Config, error) {
	cfg := defaultConfig()
	if path != "" {
		md, err := toml.DecodeFile(path, cfg)
		if err != nil {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
		if und := md.Undecoded(); len(und) > 0 {
			return nil, fmt.Errorf("config %s: unknown setting %q", path, und[0].String())
		}
	}
	cfg.fill()
	return cfg, nil
}

// fill sets the defaults that depend on other settings.
func (c *Config) fill() {
	if c.Auth.UsersFile == "" {
		c.Auth.UsersFile = filepath.Join(c.DataDir, "users")
	}
	if c.Auth.APIKeysFile == "" {
		c.Auth.APIKeysFile = filepath.Join(c.DataDir, "apikeys")
	}
	if c.Admin.TokenFile == "" {
		c.Admin.TokenFile = filepath.Join(c.DataDir, "admin-token")
	}
}

func parseDuration(name, s string, def time.Duration) (time.Duration, error) {
	if s == "" {
		return def, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", name, err)
	}
	return d, nil
}

// NATSQueueConfig configures the NATS JetStream queue backend.
type NATSQueueConfig struct {
	// URL lists the servers, comma-separated ("nats://127.0.0.1:4222").
	URL       string `toml:"url"`
	CredsFile string `toml:"creds_file"`
	NKeyFile  string `toml:"nkey_file"`
	User      string `toml:"user"`
	Password  string `toml:"password"`
	Token     string `toml:"token"`
	CAFile    string `toml:"ca_file"`
	CertFile  string `toml:"cert_file"`
	KeyFile   string `toml:"key_file"`
	// Prefix names the bucket and stream ("BATON" by default).
	Prefix string `toml:"prefix"`
	// Replicas is the JetStream replication factor (1 or 3 usually).
	Replicas int `toml:"replicas"`
	// Node names this relayd among the nodes (default: the machine's host
	// name); a restarted node frees the leases it left behind.
	Node string `toml:"node"`
	// MaxBytes caps the body stream's size.
	MaxBytes int64 `toml:"max_bytes"`
}
