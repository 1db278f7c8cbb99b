//go:build !race

package apikey

// raceEnabled: see race_on_test.go.
const raceEnabled = false
