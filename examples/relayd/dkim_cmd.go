package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/batonmail/baton/dkim"
	"github.com/batonmail/baton/mx"
)

// runDKIMCmd manages DKIM keys and checks a sender domain's DNS:
//
//	relayd dkim keygen -domain D -selector S [-type rsa|ed25519] [-bits 2048] [-out FILE]
//	relayd dkim check -domain D [-selector S[,S2]] [-relay-ip IP[,IP2]]
//
// keygen writes the private key with mode 0600 (never replacing a file;
// default DataDir/dkim/S._domainkey.D.pem) and prints the configuration
// to add and the DNS TXT record to publish. check looks up SPF, DKIM and
// DMARC through the configured DNS servers and prints what is present,
// missing or wrong, with the records to publish; it fails when anything
// is not in place.
func runDKIMCmd(ctx context.Context, cfg *Config, args []string, stdout, stderr io.Writer) error {
	usage := func() {
		fmt.Fprintln(stderr, "usage: relayd dkim keygen -domain D -selector S [-type rsa|ed25519] [-bits 2048] [-out FILE]")
		fmt.Fprintln(stderr, "       relayd dkim check -domain D [-selector S,...] [-relay-ip IP,...]")
	}
	if len(args) == 0 {
		usage()
		return errors.New("dkim: missing subcommand")
	}
	switch args[0] {
	case "keygen":
		return dkimKeygenCmd(cfg, args[1:], stdout, stderr)
	case "check":
		return dkimCheckCmd(ctx, cfg, args[1:], stdout, stderr)
	default:
		usage()
		return fmt.Errorf("dkim: unknown subcommand %q", args[0])
	}
}

func dkimKeygenCmd(cfg *Config, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("dkim keygen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	domain := fs.String("domain", "", "signing domain (required)")
	selector := fs.String("selector", "", "selector, e.g. 2026a (required)")
	typ := fs.String("type", "rsa", "key type: rsa or ed25519")
	bits := fs.Int("bits", 2048, "RSA key size (2048 to 4096)")
	out := fs.String("out", "", "private key file (default DATA_DIR/dkim/SELECTOR._domainkey.DOMAIN.pem)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *domain == "" || *selector == "" || fs.NArg() > 0 {
		fs.Usage()
		return errors.New("dkim keygen: -domain and -selector are required")
	}
	g, err := dkim.GenerateKey(dkim.GenerateConfig{
		Domain: *domain, Selector: *selector, Type: dkim.KeyType(strings.ToLower(*typ)), Bits: *bits,
	})
	if err != nil {
		return err
	}
	path := *out
	if path == "" {
		path = filepath.Join(cfg.DataDir, "dkim", g.RecordName+".pem")
	}
	if err := dkim.WriteKeyFile(path, g.PrivatePEM); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "Wrote the %s private key to %s (mode 0600).\n\n", g.Key.Type(), path)
	fmt.Fprintf(stdout, "Add it to the configuration file:\n\n[[dkim.keys]]\ndomain = %q\nselector = %q\nkey_file = %q\n\n",
		g.Key.Domain, g.Key.Selector, path)
	fmt.Fprintf(stdout, "Publish this DNS TXT record before signing with the key:\n\n%s\n\n", g.Zone)
	fmt.Fprintf(stdout, "Name:  %s\nValue: %s\n\n", g.RecordName, g.TXT)
	fmt.Fprintf(stdout, "Then check it with: relayd dkim check -domain %s -selector %s\n", g.Key.Domain, g.Key.Selector)
	return nil
}

func dkimCheckCmd(ctx context.Context, cfg *Config, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("dkim check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	domain := fs.String("domain", "", "sender domain to check (required)")
	selectors := fs.String("selector", "", "comma-separated DKIM selectors (default: the configured keys of the domain)")
	relayIPs := fs.String("relay-ip", "", "comma-separated addresses the relay sends from, which SPF must authorise")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *domain == "" || fs.NArg() > 0 {
		fs.Usage()
		return errors.New("dkim check: -domain is required")
	}
	var ips []netip.Addr
	for _, s := range splitList(*relayIPs) {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("dkim check: -relay-ip %q: %w", s, err)
		}
		ips = append(ips, ip)
	}
	keys, err := loadDKIMKeys(cfg)
	if err != nil {
		return err
	}
	timeout := time.Duration(0)
	if cfg.DNS.Timeout != "" {
		if timeout, err = time.ParseDuration(cfg.DNS.Timeout); err != nil {
			return fmt.Errorf("dkim check: dns timeout: %w", err)
		}
	}
	resolver, err := mx.NewDNS(mx.DNSConfig{Servers: cfg.DNS.Servers, Timeout: timeout})
	if err != nil {
		return err
	}
	var sels []string
	if *selectors != "" {
		sels = splitList(*selectors)
	}
	rep, err := dkim.CheckDomain(ctx, dkim.CheckConfig{
		Resolver:      resolver,
		LookupAddrs:   resolver.LookupAddrs,
		Domain:        *domain,
		Selectors:     sels,
		Keys:          keys,
		ParentDomains: cfg.DKIM.ParentDomains,
		RelayIPs:      ips,
	})
	if err != nil {
		return err
	}
	if err := rep.WriteText(stdout); err != nil {
		return err
	}
	if !rep.OK() {
		return errors.New("dkim check: not every record is in place")
	}
	return nil
}

// loadDKIMKeys loads the keys named in cfg.DKIM; nil when none are
// configured.
func loadDKIMKeys(cfg *Config) (*dkim.KeyStore, error) {
	if len(cfg.DKIM.Keys) == 0 {
		return nil, nil
	}
	files := make([]dkim.KeyFile, 0, len(cfg.DKIM.Keys))
	for _, k := range cfg.DKIM.Keys {
		files = append(files, dkim.KeyFile{Domain: k.Domain, Selector: k.Selector, Path: k.KeyFile})
	}
	return dkim.LoadKeyStore(files)
}

// newDKIMSigner builds the relay's signer from cfg.DKIM; it returns nil
// when no keys are configured (mail then goes out unsigned).
func newDKIMSigner(cfg *Config, logger *slog.Logger) (*dkim.Signer, error) {
	keys, err := loadDKIMKeys(cfg)
	if err != nil || keys == nil {
		return nil, err
	}
	var headers []string // nil: the package defaults
	if len(cfg.DKIM.Headers) > 0 {
		headers = cfg.DKIM.Headers
	}
	return dkim.NewSigner(dkim.SignerConfig{
		Keys:          keys,
		Headers:       headers,
		ParentDomains: cfg.DKIM.ParentDomains,
		Logger:        logger,
	})
}
