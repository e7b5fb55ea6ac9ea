// Command vcsim runs a simulated vCenter for Lifeboat's connector tests.
//
// It serves the vSphere SOAP API over TLS on 127.0.0.1 (a free port by default), with an
// inventory sized by flags. When it is ready it prints one line of JSON on stdout (url,
// host, port, user, password, CA file, certificate thumbprints) and writes its own view of
// the inventory to -inventory-out, so tests can check Lifeboat's discovery against an
// independent source of truth. The same view, as it is at the moment of asking, is served at
// GET /lifeboat/inventory. It exits on SIGTERM/SIGINT, or when stdin is closed.
//
// The property collector pages RetrievePropertiesEx results by RetrieveOptions.maxObjects
// (and by -max-page, like a server that caps pages on its own), with
// ContinueRetrievePropertiesEx for the rest, as vCenter does.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

var maxPage = flag.Int("max-page", 0, "largest page RetrievePropertiesEx returns even when the client asks for more (0: no cap)")

// pagingCollector is the property collector with vCenter's result paging.
type pagingCollector struct {
	simulator.PropertyCollector

	pageMu sync.Mutex
	pages  map[string]*pendingPages
}

type pendingPages struct {
	rest []types.ObjectContent
	size int
}

func pageSize(requested int32) int {
	size := int(requested)
	if *maxPage > 0 && (size <= 0 || size > *maxPage) {
		size = *maxPage
	}
	return size
}

func (pc *pagingCollector) nextPage(token string, p *pendingPages) *types.RetrieveResult {
	res := &types.RetrieveResult{}
	if len(p.rest) <= p.size {
		res.Objects = p.rest
		delete(pc.pages, token)
		return res
	}
	res.Objects = p.rest[:p.size]
	p.rest = p.rest[p.size:]
	res.Token = token
	return res
}

func (pc *pagingCollector) RetrievePropertiesEx(ctx *simulator.Context, r *types.RetrievePropertiesEx) soap.HasFault {
	out := pc.PropertyCollector.RetrievePropertiesEx(ctx, r)
	body, ok := out.(*methods.RetrievePropertiesExBody)
	if !ok || body.Res == nil || body.Res.Returnval == nil {
		return out
	}
	size := pageSize(r.Options.MaxObjects)
	objects := body.Res.Returnval.Objects
	if size <= 0 || len(objects) <= size {
		return out
	}
	pc.pageMu.Lock()
	defer pc.pageMu.Unlock()
	if pc.pages == nil {
		pc.pages = make(map[string]*pendingPages)
	}
	token := uuid.New().String()
	pc.pages[token] = &pendingPages{rest: objects[size:], size: size}
	body.Res.Returnval.Objects = objects[:size]
	body.Res.Returnval.Token = token
	return body
}

func (pc *pagingCollector) ContinueRetrievePropertiesEx(ctx *simulator.Context, r *types.ContinueRetrievePropertiesEx) soap.HasFault {
	body := &methods.ContinueRetrievePropertiesExBody{}
	pc.pageMu.Lock()
	defer pc.pageMu.Unlock()
	p, ok := pc.pages[r.Token]
	if !ok {
		body.Fault_ = simulator.Fault("unknown or expired token", &types.InvalidArgument{InvalidProperty: "token"})
		return body
	}
	body.Res = &types.ContinueRetrievePropertiesExResponse{Returnval: *pc.nextPage(r.Token, p)}
	return body
}

func (pc *pagingCollector) CancelRetrievePropertiesEx(ctx *simulator.Context, r *types.CancelRetrievePropertiesEx) soap.HasFault {
	pc.pageMu.Lock()
	defer pc.pageMu.Unlock()
	delete(pc.pages, r.Token)
	return &methods.CancelRetrievePropertiesExBody{Res: &types.CancelRetrievePropertiesExResponse{}}
}

// Inventory is the simulator's own view, written for tests.
type Inventory struct {
	Datacenters []string `json:"datacenters"`
	Clusters    []string `json:"clusters"`
	Hosts       []string `json:"hosts"`
	Datastores  []string `json:"datastores"`
	VMs         []VM     `json:"vms"`
}

type VM struct {
	InstanceUUID string     `json:"instance_uuid"`
	Name         string     `json:"name"`
	PowerState   string     `json:"power_state"`
	GuestID      string     `json:"guest_id"`
	Host         string     `json:"host"`
	Cluster      string     `json:"cluster"`
	Datacenter   string     `json:"datacenter"`
	Template     bool       `json:"template"`
	Busy         bool       `json:"busy"`
	Disks        []Disk     `json:"disks"`
	Snapshots    []Snapshot `json:"snapshots"`
}

type Disk struct {
	Key             int32  `json:"key"`
	Label           string `json:"label"`
	CapacityInKB    int64  `json:"capacity_in_kb"`
	CapacityInBytes int64  `json:"capacity_in_bytes"`
	CapacityBytes   int64  `json:"capacity_bytes"`
	BackingFile     string `json:"backing_file"`
	Datastore       string `json:"datastore"`
}

type Snapshot struct {
	ID       string `json:"id"`
	Name     string `json:"name"`
	Quiesced bool   `json:"quiesced"`
}

func entityName(ref *types.ManagedObjectReference) string {
	if ref == nil {
		return ""
	}
	if e, ok := simulator.Map.Get(*ref).(mo.Entity); ok {
		return e.Entity().Name
	}
	return ""
}

func datacenterOf(e mo.Entity) string {
	for e != nil {
		if e.Reference().Type == "Datacenter" {
			return e.Entity().Name
		}
		parent := e.Entity().Parent
		if parent == nil {
			return ""
		}
		next, _ := simulator.Map.Get(*parent).(mo.Entity)
		e = next
	}
	return ""
}

func names(kind string) []string {
	out := []string{}
	for _, e := range simulator.Map.All(kind) {
		out = append(out, e.Entity().Name)
	}
	sort.Strings(out)
	return out
}

func snapshots(tree []types.VirtualMachineSnapshotTree, out *[]Snapshot) {
	for _, s := range tree {
		*out = append(*out, Snapshot{ID: s.Snapshot.Value, Name: s.Name, Quiesced: s.Quiesced})
		snapshots(s.ChildSnapshotList, out)
	}
}

func describeVM(vm *simulator.VirtualMachine) VM {
	v := VM{
		Name:       vm.Name,
		PowerState: string(vm.Runtime.PowerState),
		Datacenter: datacenterOf(vm),
		Disks:      []Disk{},
		Snapshots:  []Snapshot{},
	}
	if vm.Config != nil {
		v.InstanceUUID = vm.Config.InstanceUuid
		v.GuestID = vm.Config.GuestId
		v.Template = vm.Config.Template
		for _, dev := range vm.Config.Hardware.Device {
			disk, ok := dev.(*types.VirtualDisk)
			if !ok {
				continue
			}
			d := Disk{Key: disk.Key, CapacityInKB: disk.CapacityInKB, CapacityInBytes: disk.CapacityInBytes}
			d.CapacityBytes = disk.CapacityInBytes
			if d.CapacityBytes == 0 {
				d.CapacityBytes = disk.CapacityInKB * 1024
			}
			if disk.DeviceInfo != nil {
				d.Label = disk.DeviceInfo.GetDescription().Label
			}
			if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
				info := b.GetVirtualDeviceFileBackingInfo()
				d.BackingFile = info.FileName
				d.Datastore = entityName(info.Datastore)
			}
			v.Disks = append(v.Disks, d)
		}
	}
	if vm.Runtime.Host != nil {
		if host, ok := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem); ok {
			v.Host = host.Name
			if host.Parent != nil && host.Parent.Type == "ClusterComputeResource" {
				v.Cluster = entityName(host.Parent)
			}
		}
	}
	if vm.Snapshot != nil {
		snapshots(vm.Snapshot.RootSnapshotList, &v.Snapshots)
	}
	return v
}

func inventory() Inventory {
	inv := Inventory{
		Datacenters: names("Datacenter"),
		Clusters:    names("ClusterComputeResource"),
		Hosts:       names("HostSystem"),
		Datastores:  names("Datastore"),
		VMs:         []VM{},
	}
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm, busy := asVM(e)
		simulator.Map.WithLock(e, func() {
			v := describeVM(vm)
			v.Busy = busy
			inv.VMs = append(inv.VMs, v)
		})
	}
	sort.Slice(inv.VMs, func(i, j int) bool { return inv.VMs[i].Name < inv.VMs[j].Name })
	return inv
}

func writeJSON(path string, v interface{}) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := ioutil.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// busyVM fails every power-off with a task fault, as a VM does while another task holds it.
type busyVM struct {
	simulator.VirtualMachine // by value: the simulator finds the managed object in the first field
}

func (vm *busyVM) PowerOffVMTask(ctx *simulator.Context, req *types.PowerOffVM_Task) soap.HasFault {
	task := simulator.CreateTask(req.This, "powerOff", func(t *simulator.Task) (types.AnyType, types.BaseMethodFault) {
		fault := &types.TaskInProgress{Task: t.Self}
		fault.FaultMessage = []types.LocalizableMessage{{
			Key:     "vcsim.busy",
			Message: "Another task is already in progress on this virtual machine",
		}}
		return nil, fault
	})
	return &methods.PowerOffVM_TaskBody{Res: &types.PowerOffVM_TaskResponse{Returnval: task.Run()}}
}

func asVM(e mo.Reference) (*simulator.VirtualMachine, bool) {
	switch vm := e.(type) {
	case *simulator.VirtualMachine:
		return vm, false
	case *busyVM:
		return &vm.VirtualMachine, true
	}
	return nil, false
}

// applyQuirks gives some VMs the shapes real servers produce: templates, VMs with no host
// (orphaned or disconnected), VMs whose guest OS is not reported and VMs that refuse to
// power off.
func applyQuirks(templates, orphans, noGuest, busy int) {
	all := simulator.Map.All("VirtualMachine")
	sort.Slice(all, func(i, j int) bool { return all[i].Entity().Name < all[j].Entity().Name })
	i := 0
	take := func(n int, f func(vm *simulator.VirtualMachine)) {
		for ; n > 0 && i < len(all); n-- {
			f(all[i].(*simulator.VirtualMachine))
			i++
		}
	}
	take(templates, func(vm *simulator.VirtualMachine) {
		vm.Runtime.PowerState = types.VirtualMachinePowerStatePoweredOff
		vm.Summary.Runtime.PowerState = types.VirtualMachinePowerStatePoweredOff
		vm.Config.Template = true
		vm.Summary.Config.Template = true
	})
	take(orphans, func(vm *simulator.VirtualMachine) {
		vm.Runtime.Host = nil
		vm.Summary.Runtime.Host = nil
	})
	take(noGuest, func(vm *simulator.VirtualMachine) {
		vm.Config.GuestId = ""
		vm.Config.GuestFullName = ""
		vm.Summary.Config.GuestId = ""
		vm.Summary.Config.GuestFullName = ""
		vm.Guest = nil
		vm.Summary.Guest = nil
	})
	take(busy, func(vm *simulator.VirtualMachine) {
		simulator.Map.Put(&busyVM{*vm})
	})
}

// newCertificate makes a throwaway CA and a server certificate for 127.0.0.1 signed by it.
func newCertificate() (tls.Certificate, []byte, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano()),
		Subject:               pkix.Name{CommonName: "Lifeboat test vcsim CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano() + 1),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, caPEM, nil
}

func colonHex(sum []byte) string {
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0: a free port)")
	dc := flag.Int("dc", 1, "datacenters")
	cluster := flag.Int("cluster", 1, "clusters per datacenter")
	host := flag.Int("host", 3, "hosts per cluster")
	standalone := flag.Int("standalone-host", 1, "standalone hosts per datacenter")
	vm := flag.Int("vm", 2, "VMs per standalone host and per cluster")
	ds := flag.Int("ds", 1, "datastores per datacenter")
	pg := flag.Int("pg", 1, "distributed port groups per datacenter")
	autostart := flag.Bool("autostart", true, "power on the VMs")
	templates := flag.Int("templates", 0, "turn this many VMs into templates")
	orphans := flag.Int("orphans", 0, "this many VMs report no host")
	noGuest := flag.Int("no-guest", 0, "this many VMs report no guest OS")
	busy := flag.Int("busy", 0, "this many VMs fail to power off (task fault: another task in progress)")
	user := flag.String("username", "administrator@vsphere.local", "user name")
	password := flag.String("password", "vcsim-password", "password")
	inventoryOut := flag.String("inventory-out", "", "write the inventory as JSON to this file when ready")
	caOut := flag.String("ca-out", "", "write the PEM of the CA that signed the server certificate to this file")
	stdinEOF := flag.Bool("exit-on-stdin-eof", true, "exit when stdin is closed")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("vcsim: ")

	model := simulator.VPX()
	model.Datacenter = *dc
	model.Cluster = *cluster
	model.ClusterHost = *host
	model.Host = *standalone
	model.Machine = *vm
	model.Datastore = *ds
	model.Portgroup = *pg
	model.Autostart = *autostart
	if err := model.Create(); err != nil {
		log.Fatalf("creating the inventory: %v", err)
	}
	defer model.Remove()
	applyQuirks(*templates, *orphans, *noGuest, *busy)

	si := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance)
	pc := &pagingCollector{}
	pc.Self = si.Content.PropertyCollector
	simulator.Map.Put(pc)

	cert, caPEM, err := newCertificate()
	if err != nil {
		log.Fatalf("making a certificate: %v", err)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}
	model.Service.HandleFunc("/lifeboat/inventory", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(inventory())
	})
	server := model.Service.NewServer()
	defer server.Close()

	caFile := ""
	if *caOut != "" {
		caFile, _ = filepath.Abs(*caOut)
		if err := ioutil.WriteFile(caFile, caPEM, 0o600); err != nil {
			log.Fatalf("writing %s: %v", caFile, err)
		}
	}
	if *inventoryOut != "" {
		if err := writeJSON(*inventoryOut, inventory()); err != nil {
			log.Fatalf("writing %s: %v", *inventoryOut, err)
		}
	}

	addr := server.Listener.Addr().(*net.TCPAddr)
	sha1Sum := sha1.Sum(cert.Certificate[0])
	sha256Sum := sha256.Sum256(cert.Certificate[0])
	ready, _ := json.Marshal(map[string]interface{}{
		"url":               "https://" + net.JoinHostPort(addr.IP.String(), strconv.Itoa(addr.Port)) + "/sdk",
		"host":              addr.IP.String(),
		"port":              addr.Port,
		"user":              *user,
		"password":          *password,
		"ca_file":           caFile,
		"thumbprint_sha1":   colonHex(sha1Sum[:]),
		"thumbprint_sha256": colonHex(sha256Sum[:]),
		"pid":               os.Getpid(),
	})
	fmt.Println(string(ready))

	done := make(chan string, 2)
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() { done <- (<-signals).String() }()
	if *stdinEOF {
		go func() {
			_, _ = io.Copy(ioutil.Discard, os.Stdin)
			done <- "stdin closed"
		}()
	}
	log.Printf("stopping: %s", <-done)
}
